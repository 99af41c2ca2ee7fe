"""DVC stage `backdoor@TRIGGER-SEED`: --start (models/clean) fine-tuned on --data (data/poisoned/TRIGGER) with
training seed SEED -> --out (models/backdoor-TRIGGER-sSEED)."""
from clipshield.params import AttackParams, BackdoorParams, EvalParams, PoisonParams, load_section
from clipshield.work.backdoor import backdoor
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, keys=("trigger", "seed"), paths=("start", "data", "test", "out", "metrics"))
    run(lambda: backdoor(a.trigger, load_section(AttackParams, "attack"), load_section(PoisonParams, "poison"),
                         load_section(BackdoorParams, "backdoor"), load_section(EvalParams, "eval"), int(a.seed),
                         a.start, a.data, a.test, a.out, a.metrics), distributed=True)


if __name__ == "__main__":
    main()
