"""DVC stage `harden@RUN`: FARE/TeCoA fine-tuning of the run's start model --start on --data -> --out (models/RUN)
(the run's method, start and optional eps: params.yaml harden.runs.RUN, or RUN = <method>-<start>-<trigger>-s<seed>
of harden.matrix), robust metrics against --reference."""
from clipshield.params import AttackParams, EvalParams, HardenParams, RobustParams, harden_runs, load_section, read_yaml
from clipshield.work.harden import harden
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, keys=("run",), paths=("start", "reference", "data", "test", "out", "metrics"))

    def work():
        p, raw = load_section(HardenParams, "harden"), read_yaml("params.yaml")
        runs = harden_runs(raw)
        harden(a.run, runs, p, load_section(RobustParams, "robust"), load_section(AttackParams, "attack"),
               load_section(EvalParams, "eval"), raw.get(runs.get(a.run, {}).get("method")) or {}, a.start,
               a.reference, a.data, a.test, a.out, a.metrics)
    run(work, distributed=True)


if __name__ == "__main__":
    main()
