"""DVC stage `detect@TRIGGER`: every pair of --data (data/poisoned/TRIGGER) scored for being a backdoor sample with
the image embeddings of --backdoored (models/backdoor-TRIGGER-s<first seed>) and of --clean (the control) ->
--metrics (AUROC per model and score), --out (the backdoored model's per-pair scores and their distributions)."""
from clipshield.params import DetectParams, load_section
from clipshield.work.detect import detect
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, keys=("trigger",), paths=("data", "backdoored", "clean", "metrics", "out"))
    run(lambda: detect(a.trigger, load_section(DetectParams, "detect"), a.data, a.backdoored, a.clean, a.metrics,
                       a.out))


if __name__ == "__main__":
    main()
