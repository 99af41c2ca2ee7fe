"""DVC stage `filtered@TRIGGER-SEED`: --start (models/clean) trained as the backdoor stage trains it, training seed
SEED, on --data (data/filtered/TRIGGER: the poisoned set without its most suspicious pairs) -> --out
(models/filtered-TRIGGER-sSEED)."""
from clipshield.params import AttackParams, BackdoorParams, DetectParams, EvalParams, PoisonParams, load_section
from clipshield.work.filtered import filtered
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, keys=("trigger", "seed"), paths=("start", "data", "test", "out", "metrics"))
    run(lambda: filtered(a.trigger, load_section(AttackParams, "attack"), load_section(PoisonParams, "poison"),
                         load_section(DetectParams, "detect"), load_section(BackdoorParams, "backdoor"),
                         load_section(EvalParams, "eval"), int(a.seed), a.start, a.data, a.test, a.out, a.metrics),
        distributed=True)


if __name__ == "__main__":
    main()
