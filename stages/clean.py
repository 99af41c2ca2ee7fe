"""DVC stage `clean@TRIGGER-METHOD-SEED`: models/backdoor-TRIGGER-sSEED cleaned with METHOD on synthetic pairs
-> models/METHOD-TRIGGER-sSEED."""
import sys

from clipshield.pipeline import clean
from clipshield.stage import run

run(lambda: clean(sys.argv[1], sys.argv[2], int(sys.argv[3])), distributed=True)
