"""DVC stage `poison@TRIGGER`: data/train with the trigger on round(rate*N) samples -> data/poisoned/TRIGGER."""
import sys

from clipshield.params import AttackParams, PoisonParams, load_section
from clipshield.pipeline import poison
from clipshield.stage import run

run(lambda: poison(sys.argv[1], load_section(AttackParams, "attack"), load_section(PoisonParams, "poison")))
