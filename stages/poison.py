"""DVC stage `poison@TRIGGER`: the shards --data with the trigger on round(rate*N) samples -> --out."""
from clipshield.params import AttackParams, PoisonParams, load_section
from clipshield.work.poison import poison
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, keys=("trigger",), paths=("data", "out"))
    run(lambda: poison(a.trigger, load_section(AttackParams, "attack"), load_section(PoisonParams, "poison"),
                       a.data, a.out))


if __name__ == "__main__":
    main()
