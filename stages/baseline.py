"""DVC stage `baseline`: the clean model's ASR for every trigger of attack.triggers -> --metrics, and with every
class as the target -> --targets."""
from clipshield.params import AttackParams, EvalParams, load_section
from clipshield.work.baseline import baseline
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, paths=("model", "test", "metrics", "targets"))
    run(lambda: baseline(load_section(AttackParams, "attack"), load_section(EvalParams, "eval"),
                         a.model, a.test, a.metrics, a.targets))


if __name__ == "__main__":
    main()
