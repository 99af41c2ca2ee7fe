"""DVC stage `backdoor@TRIGGER`: models/clean fine-tuned on data/poisoned/TRIGGER -> models/backdoor-TRIGGER."""
import sys

from clipshield.params import AttackParams, BackdoorParams, EvalParams, PoisonParams, load_section
from clipshield.pipeline import backdoor
from clipshield.stage import run

run(lambda: backdoor(sys.argv[1], load_section(AttackParams, "attack"), load_section(PoisonParams, "poison"),
                     load_section(BackdoorParams, "backdoor"), load_section(EvalParams, "eval")))
