"""Per-purpose seeds: every random draw that belongs to one sample gets its own seed, derived from a hash of
(purpose, seed, index), so seeds of different purposes never coincide (a poisoned training sample's trigger
and a test image's trigger, or a caption draw and an image draw) whatever the params' seeds are.

Arithmetic schemes (seed * stride + index, OFFSET + index) collide as soon as a seed or an index is large
enough; a 62-bit hash collides with probability about n^2 / 2^63 for n seeds (1e-8 for 3e5 seeds of every
purpose together). 62 bits leave room for `seed + 1` (badnet draws its noise from it) in torch's 64-bit range.
"""
from __future__ import annotations

import hashlib

POISON_TRIGGER = "poison-trigger"   # the trigger of poisoned training sample `index` (poison.seed)
POISON_CAPTION = "poison-caption"   # the template of its caption naming the target
EVAL_TRIGGER = "eval-trigger"       # the trigger of test image `index` (ASR, retrieval ASR, report gallery)
EVAL_SEED = 0                       # the evaluation's own seed: test images are triggered the same way everywhere


def derive_seed(purpose: str, seed: int, index: int) -> int:
    """A seed in [0, 2^62) for draw `index` of `purpose` under `seed`; pure and stable across runs and machines."""
    if "\x00" in purpose:
        raise ValueError(f"purpose {purpose!r} must not contain NUL")
    digest = hashlib.blake2b(f"{purpose}\x00{int(seed)}\x00{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2
