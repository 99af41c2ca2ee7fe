"""The contract between a method and the training loop (training.train, training.accumulate)."""
from __future__ import annotations

import torch

from ..distributed import gather


def set_train_mode(model: torch.nn.Module, train_batchnorm: bool = True) -> None:
    """Train mode; with `train_batchnorm=False` batch-norm layers keep using (and keep) their running
    statistics, so a fine-tuned ResNet tower equals its frozen start copy f^0 until its weights move
    (otherwise S_I of PAR and FARE's loss are not zero at step 0)."""
    model.train()
    if not train_batchnorm:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


class Objective:
    """One training method: `objective(batch, clip, frozen) -> (loss, logs)`.

    A subclass names itself, says which parameters it trains (`trainable`) and computes its loss in one of two
    shapes: `encode` (per-sample features) + `loss` (over the features of the whole global batch, e.g.
    contrastive) with `whole_batch_loss = True`, or `batch_loss` (a mean of per-sample terms). Every random
    draw of a step belongs in `prepare`, so gradient accumulation draws once for the whole batch."""
    name = "objective"
    needs_frozen = False       # the loop keeps a frozen copy of the start model (f^0) and passes it as `frozen`
    train_batchnorm = True     # False: batch-norm layers keep using (and keep) the start model's running statistics
    whole_batch_loss = False   # True: `encode` + `loss`; False: `batch_loss`

    def trainable(self, clip) -> list[tuple[str, torch.nn.Parameter]]:
        """The (name, parameter) pairs this method trains."""
        raise NotImplementedError

    def prepare(self, batch: dict) -> dict:
        """Every random draw of the step (augmentations, attack starts), made once for this process's whole batch."""
        return batch

    def encode(self, batch: dict, clip, frozen) -> dict[str, torch.Tensor]:
        """Per-sample features, one row per sample of `batch`; features of the frozen model carry no gradient."""
        raise NotImplementedError

    def loss(self, features: dict[str, torch.Tensor], clip) -> tuple[torch.Tensor, dict]:
        """The loss over a (global) batch of features."""
        raise NotImplementedError

    def batch_loss(self, batch: dict, clip, frozen) -> tuple[torch.Tensor, dict]:
        """The mean of per-sample losses over `batch`."""
        raise NotImplementedError

    def state_dict(self) -> dict | None:
        """What a resumed run must continue (e.g. a random stream); None: nothing."""
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

    def __call__(self, batch: dict, clip, frozen) -> tuple[torch.Tensor, dict]:
        batch = self.prepare(batch)
        if self.whole_batch_loss:
            features = self.encode(batch, clip, frozen)
            return self.loss({k: gather(v) for k, v in features.items()}, clip)  # the global batch under torchrun
        return self.batch_loss(batch, clip, frozen)
