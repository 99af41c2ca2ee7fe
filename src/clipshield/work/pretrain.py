"""Stage `pretrain`: a tiny CLIP trained from scratch (or from `pretrained`) on the clean train shards."""
from __future__ import annotations

from ..models import create
from ..objectives import build_objective
from ..params import EvalParams
from .common import data_hash
from .train import train_model


def pretrain(p, ev: EvalParams, train_dir, test_dir, out_model, metrics_file) -> dict:
    """Pre-train a CLIP model from scratch (or from `p.pretrained`) on the clean train shards."""
    clip = create(p.model, pretrained=p.pretrained, seed=p.seed)
    return train_model(clip, build_objective("clip"), train_dir, p, ev, test_dir, out_model, metrics_file,
                       dict(stage="pretrain", parent=p.pretrained or f"random init ({p.model}, seed {p.seed})",
                            model_config=p.model, data={"train": data_hash(train_dir)}, params=vars(p)),
                       log_name="pretrain")
