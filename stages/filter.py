"""DVC stage `filter@TRIGGER`: --data (data/poisoned/TRIGGER) without the detect.filter_fraction of its pairs that
score highest by detect.score in --scores (the detect stage's out) -> --out (data/filtered/TRIGGER); --metrics
counts the poisoned pairs dropped and left."""
from clipshield.params import DetectParams, load_section
from clipshield.work.filtered import filter_set
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, keys=("trigger",), paths=("data", "scores", "out", "metrics"))
    run(lambda: filter_set(a.trigger, load_section(DetectParams, "detect"), a.data, a.scores, a.out, a.metrics))


if __name__ == "__main__":
    main()
