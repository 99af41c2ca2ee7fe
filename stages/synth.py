"""DVC stage `synth`: synthetic image-text pairs into --out (data/synth) (params: the `synth:` section).

Under torchrun each process reads RANK / WORLD_SIZE and makes its own shards; the last one to
finish writes OUT/sizes.json. Re-running resumes: complete shards are kept.
"""
from clipshield.data.synth import synth_stage
from clipshield.params import read_yaml
from clipshield.stage import arguments, run


def main() -> None:
    a = arguments(__doc__, paths=("out",))
    run(lambda: synth_stage(read_yaml("params.yaml").get("synth"), a.out))


if __name__ == "__main__":
    main()
