"""DVC stage `harden@METHOD-START`: FARE/TeCoA fine-tuning of models/START -> models/METHOD-START."""
import sys

from clipshield.robust import harden
from clipshield.stage import run

run(lambda: harden(sys.argv[1], sys.argv[2]))
