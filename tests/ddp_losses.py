"""Run by tests/test_distributed.py, alone or under torchrun: train a few steps, write the logged losses.

    python tests/ddp_losses.py DATA OUT MODEL OBJECTIVE STEPS GLOBAL_BATCH
"""
import json
import sys

import torch

from clipshield import distributed, models
from clipshield.data import shards
from clipshield.objectives import build_objective
from clipshield.training import TrainConfig, train

torch.set_num_threads(1)
data, out, model, objective, steps, batch = sys.argv[1:7]
distributed.init_from_env()
clip = models.create(model, seed=0)
options = {"noise_p": 0.0, "erase_p": 0.0} if objective == "par" else {}  # augmentation draws are per rank
obj = build_objective(objective, **options)
frozen = models.frozen_copy(clip) if getattr(obj, "needs_frozen", False) else None
cfg = TrainConfig(steps=int(steps), lr=1e-3, warmup=0, schedule="constant", weight_decay=0.0, log_every=1)
result = train(clip, obj, shards.iter_batches(data, int(batch), shuffle=32, seed=1), cfg, frozen=frozen)
if distributed.is_main():
    json.dump({"loss": [r["loss"] for r in result.history], "s_i": [r.get("s_i") for r in result.history],
               "world": distributed.world()[1]}, open(out, "w"))
