"""DVC stage `harden@RUN`: FARE/TeCoA fine-tuning of the run's start model --start on --data -> --out (models/RUN)
(the run's method, start and optional eps: params.yaml harden.runs.RUN), robust metrics against --reference."""
from clipshield.params import AttackParams, EvalParams, HardenParams, RobustParams, load_section, read_yaml
from clipshield.work.harden import harden
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, keys=("run",), paths=("start", "reference", "data", "test", "out", "metrics"))

    def work():
        p = load_section(HardenParams, "harden")
        method = p.runs.get(a.run, {}).get("method")
        harden(a.run, p, load_section(RobustParams, "robust"), load_section(AttackParams, "attack"),
               load_section(EvalParams, "eval"), read_yaml("params.yaml").get(method) or {}, a.start, a.reference,
               a.data, a.test, a.out, a.metrics)
    run(work, distributed=True)


if __name__ == "__main__":
    main()
