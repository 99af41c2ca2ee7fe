"""DVC stage `clean@TRIGGER-METHOD`: models/backdoor-TRIGGER cleaned with METHOD on synthetic pairs."""
import sys

from clipshield.pipeline import clean
from clipshield.stage import run

run(lambda: clean(sys.argv[1], sys.argv[2]))
