"""DVC stage `pretrain`: a tiny CLIP trained from scratch on the clean shards -> models/clean."""
from clipshield.params import EvalParams, PretrainParams, load_section
from clipshield.pipeline import pretrain
from clipshield.stage import run

run(lambda: pretrain(load_section(PretrainParams, "pretrain"), load_section(EvalParams, "eval")), distributed=True)
