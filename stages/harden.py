"""DVC stage `harden@RUN`: FARE/TeCoA fine-tuning of the run's start model -> models/RUN
(the run's method, start and optional eps: params.yaml harden.runs.RUN)."""
import sys

from clipshield.pipeline import harden
from clipshield.stage import run

run(lambda: harden(sys.argv[1]), distributed=True)
