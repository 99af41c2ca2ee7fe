"""DVC stage `data`: the procedural world's train and test shards."""
from clipshield.params import DataParams, load_section
from clipshield.pipeline import make_data
from clipshield.stage import run

run(lambda: make_data(load_section(DataParams, "data")))
