"""DVC stage `robust`: robust accuracy and distortion of --model (the clean model: the baseline row)."""
from clipshield.params import EvalParams, RobustParams, load_section
from clipshield.work.robust import robust_baseline
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, paths=("model", "reference", "test", "metrics"))
    run(lambda: robust_baseline(load_section(RobustParams, "robust"), load_section(EvalParams, "eval"),
                                a.model, a.reference, a.test, a.metrics))


if __name__ == "__main__":
    main()
