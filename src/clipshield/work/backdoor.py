"""Stage `backdoor`: the clean model fine-tuned on poisoned shards, refused if its backdoor did not take."""
from __future__ import annotations

import dataclasses

from ..errors import TrainingError
from ..objectives import build_objective
from ..params import EvalParams
from .common import data_hash, parent_model
from .train import train_model


class AttackDidNotTake(TrainingError):
    pass


def check_backdoor(asr: float, min_asr: float, trigger: str, p, rate: float) -> None:
    """The sanity gate: a backdoor whose ASR stays below `min_asr` fails the stage, loudly."""
    if asr < min_asr:
        raise AttackDidNotTake(
            f"the {trigger} backdoor did not take: ASR {asr:.1%} < backdoor.min_asr {min_asr:.0%}. "
            f"Raise poison.rate (now {rate}), backdoor.steps (now {p.steps}) or backdoor.lr (now {p.lr:g}), "
            f"or strengthen the trigger in attack.options.{trigger}; or lower backdoor.min_asr deliberately")


def backdoor(trigger: str, attack, poison_p, p, ev: EvalParams, seed, start, data_dir, test_dir, out_model,
             metrics_file) -> dict:
    """Fine-tune the clean model `start` with the CLIP loss (training seed `seed`) on the shards poisoned with
    `trigger` -> `out_model` (backdoor-<trigger>-s<seed>)."""
    p = dataclasses.replace(p, seed=seed)
    options = attack.options.get(trigger, {})
    return train_model(start, build_objective("clip"), data_dir, p, ev, test_dir, out_model, metrics_file,
                       dict(stage="backdoor", seed=seed, parent=parent_model(start),
                            attack={"kind": "backdoor", "trigger": trigger, "options": options, "rate": poison_p.rate,
                                    "target": attack.target, "seed": poison_p.seed},
                            data={"train": data_hash(data_dir)}, params=vars(p)),
                       {trigger: options}, attack.target,
                       check=lambda m: check_backdoor(m["asr"], p.min_asr, trigger, p, poison_p.rate))
