"""DVC stage `baseline`: the clean model's ASR for every trigger of attack.triggers -> metrics/baseline.json."""
from clipshield.params import AttackParams, EvalParams, load_section
from clipshield.pipeline import baseline
from clipshield.stage import run

run(lambda: baseline(load_section(AttackParams, "attack"), load_section(EvalParams, "eval")))
