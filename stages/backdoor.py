"""DVC stage `backdoor@TRIGGER-SEED`: models/clean fine-tuned on data/poisoned/TRIGGER with training seed SEED
-> models/backdoor-TRIGGER-sSEED."""
import sys

from clipshield.params import AttackParams, BackdoorParams, EvalParams, PoisonParams, load_section
from clipshield.pipeline import backdoor
from clipshield.stage import run

run(lambda: backdoor(sys.argv[1], load_section(AttackParams, "attack"), load_section(PoisonParams, "poison"),
                     load_section(BackdoorParams, "backdoor"), load_section(EvalParams, "eval"), seed=int(sys.argv[2])), distributed=True)
