"""Run by tests/test_distributed.py, alone or under torchrun: train a few steps, write the logged losses.

    python tests/ddp_losses.py DATA OUT MODEL OBJECTIVE STEPS GLOBAL_BATCH [CHECKPOINT EVERY [CRASH_AFTER]]

With CRASH_AFTER the process dies (os._exit, no clean-up) after that many steps, leaving its checkpoint.
The environment variable ACCUM sets gradient accumulation (micro-batches per step, default 1).
"""
import json
import os
import sys
from pathlib import Path

import torch

from clipshield import distributed, models
from clipshield.data import shards
from clipshield.objectives import build_objective
from clipshield.training import Checkpoint, TrainConfig, train

torch.set_num_threads(1)
data, out, model, objective, steps, batch = sys.argv[1:7]
checkpoint = Checkpoint(Path(sys.argv[7]), int(sys.argv[8]), "test-run") if len(sys.argv) > 8 else None
crash_after = int(sys.argv[9]) if len(sys.argv) > 9 else None
distributed.init_from_env()
clip = models.create(model, seed=0)
options = {"noise_p": 0.0, "erase_p": 0.0} if objective == "par" else {}  # augmentation draws are per rank
obj = build_objective(objective, **options)
frozen = models.frozen_copy(clip) if getattr(obj, "needs_frozen", False) else None
cfg = TrainConfig(steps=int(steps), lr=1e-3, warmup=0, schedule="constant", weight_decay=0.0, log_every=1,
                  accum=int(os.environ.get("ACCUM", "1")))


def batches(start):
    for i, b in enumerate(shards.iter_batches(data, int(batch), shuffle=32, seed=1, start=start)):
        if crash_after is not None and start + i == crash_after:
            os._exit(3)
        yield b


result = train(clip, obj, batches, cfg, frozen=frozen, checkpoint=checkpoint)
if distributed.is_main():
    json.dump({"loss": [r["loss"] for r in result.history], "s_i": [r.get("s_i") for r in result.history],
               "world": distributed.world()[1]}, open(out, "w"))
