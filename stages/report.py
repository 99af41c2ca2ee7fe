"""DVC stage `report`: --out (reports/) from the metrics of every model --metrics, the training logs --dvclive and
the stages' wall times --times: the comparison table, the plots and the trigger gallery."""
from clipshield.stage import arguments, run
from clipshield.work.report import report


def main() -> None:
    a = arguments(__doc__, paths=("metrics", "dvclive", "times", "out"))
    # Not timed: the report reads times/, and a time of its own there would change its own input.
    run(lambda: report("params.yaml", a.metrics, a.out, a.dvclive, a.times), timed=False)


if __name__ == "__main__":
    main()
