"""Shared test setup: offline Hugging Face hub and one torch thread (the machine has 2 busy cores)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
