"""DVC stage `badclip`: the BadCLIP patch optimised against --model on --train -> --out (patch.pt, patch.png)."""
from clipshield.params import AttackParams, BadclipParams, load_section
from clipshield.work.badclip import badclip
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, paths=("model", "train", "out"))
    run(lambda: badclip(load_section(AttackParams, "attack"), load_section(BadclipParams, "badclip"), a.model,
                        a.train, a.out))


if __name__ == "__main__":
    main()
