"""DVC stage `data`: the procedural world's (or imported) train and test shards -> --train, --test."""
from clipshield.params import DataParams, load_section
from clipshield.work.data import make_data
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, paths=("train", "test"))
    run(lambda: make_data(load_section(DataParams, "data"), a.train, a.test))


if __name__ == "__main__":
    main()
