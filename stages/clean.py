"""DVC stage `clean@TRIGGER-METHOD-SEED`: --start (models/backdoor-TRIGGER-sSEED) cleaned with METHOD on the
synthetic pairs --data -> --out (models/METHOD-TRIGGER-sSEED)."""
from clipshield.params import AttackParams, CleanParams, EvalParams, load_section, read_yaml
from clipshield.work.clean import clean
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, keys=("trigger", "method", "seed"), paths=("start", "data", "test", "out", "metrics"))
    run(lambda: clean(a.trigger, a.method, int(a.seed), load_section(CleanParams, "clean"),
                      load_section(AttackParams, "attack"), load_section(EvalParams, "eval"),
                      read_yaml("params.yaml").get(a.method) or {}, a.start, a.data, a.test, a.out, a.metrics),
        distributed=True)


if __name__ == "__main__":
    main()
