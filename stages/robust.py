"""DVC stage `robust`: robust accuracy and distortion of the clean model (the baseline row)."""
from clipshield.pipeline import robust_baseline
from clipshield.stage import run

run(lambda: robust_baseline("clean"))
