"""DVC stage `pretrain`: a tiny CLIP trained from scratch on the clean shards --train -> --out (models/clean)."""
from clipshield.params import EvalParams, PretrainParams, load_section
from clipshield.work.pretrain import pretrain
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, paths=("train", "test", "out", "metrics"))
    run(lambda: pretrain(load_section(PretrainParams, "pretrain"), load_section(EvalParams, "eval"),
                         a.train, a.test, a.out, a.metrics), distributed=True)


if __name__ == "__main__":
    main()
