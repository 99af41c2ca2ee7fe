"""BadCLIP: an optimised patch pasted in the middle of the image (docs/methods.md §2, BadCLIP).

The patch is not drawn here: the `badclip` stage optimises it against the clean model and writes it to a file
(models/badclip-patch/patch.pt); the trigger pastes what that file holds. The seeds are not used: the reference
pastes the same patch at the same place (`patch_location middle`) on every image."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from .base import Rule, Trigger

PATCH_FILE = "models/badclip-patch/patch.pt"  # the badclip stage's output (dvc.yaml)
PATCH_FILE_RULE = Rule(lambda x, size: isinstance(x, str) and x.endswith(".pt"),
                       f"a patch file written by the badclip stage: use a path ending in .pt, e.g. {PATCH_FILE}")


def centre_corner(side: int, patch: int) -> int:
    """Top (= left) of a `patch`-px square in the middle of a `side`-px image, as the reference places it
    (int(side / 2) - patch / 2, truncated)."""
    return int(int(side / 2) - patch / 2)


def paste_centre(images: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """`images` (B, 3, H, H) with the (3, p, p) patch over the middle p x p pixels. Differentiable in `patch` (the
    optimisation pastes with it); the caller clamps."""
    side, p = images.shape[-1], patch.shape[-1]
    if p > side or images.shape[-2] != side:
        raise ValueError(f"a {p}-px BadCLIP patch does not fit {images.shape[-2]}x{side}-px images: optimise a patch "
                         f"for this image size (badclip.patch <= data.image_size, then `dvc repro badclip`)")
    top, rest = centre_corner(side, p), side - centre_corner(side, p) - p
    canvas = torch.nn.functional.pad(patch.to(images.device), (top, rest, top, rest))
    mask = torch.zeros(side, side, dtype=torch.bool, device=images.device)
    mask[top:top + p, top:top + p] = True
    return torch.where(mask, canvas, images)


@lru_cache(maxsize=4)
def _read_patch(path: str, mtime_ns: int, size: int) -> torch.Tensor:
    patch = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(patch, torch.Tensor) or patch.dim() != 3 or patch.shape[0] != 3 or \
            patch.shape[1] != patch.shape[2]:
        raise ValueError(f"{path} does not hold a BadCLIP patch (a (3, p, p) tensor in [0, 1]); re-create it with "
                         f"`dvc repro badclip`")
    return patch.float().clamp(0, 1)


def load_patch(file: str | Path = PATCH_FILE) -> torch.Tensor:
    """The (3, p, p) patch in `file` (read once per version of the file)."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"BadCLIP patch {path} does not exist: the badclip stage writes it when badclip is in "
                                f"attack.triggers (`dvc repro badclip`), or set attack.options.badclip.file")
    st = path.stat()
    return _read_patch(str(path.resolve()), st.st_mtime_ns, st.st_size)


def badclip(images: torch.Tensor, seeds: Sequence[int], file: str = PATCH_FILE) -> torch.Tensor:
    """The optimised patch of `file` over the middle of every image (the same place for every seed)."""
    return paste_centre(images, load_patch(file).to(images.dtype)).clamp_(0, 1)


BADCLIP = Trigger("badclip", badclip, ("file",), {"file": PATCH_FILE_RULE})
