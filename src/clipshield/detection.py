"""Backdoor-sample detection in a training set (docs/methods.md §9): local outlier scores of each pair's image
embedding among the others' (k-distance, SLOF, DAO; higher = more suspicious), and how well they rank the poisoned
pairs first (AUROC, precision at the poison rate). Pure functions on tensors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

CHUNK_ELEMENTS = 2 ** 24  # distances held at once by `neighbours` (64 MiB of float32): 512 rows of a 32k set
LOG_FLOOR = 1e-4          # the reference's guard in log(r_i / r_k) against duplicate points (r_i = 0)
NAN_SCORE = 1000.0        # the reference's score for 0/0 (a point whose neighbours all coincide): most suspicious


@dataclass(frozen=True)
class Neighbours:
    """Each point's k nearest other points: distances (N, k), ascending, and their indices (N, k)."""
    dist: torch.Tensor
    idx: torch.Tensor

    @property
    def k(self) -> int:
        return self.dist.shape[1]


def neighbours(x: torch.Tensor, k: int, chunk_elements: int = CHUNK_ELEMENTS) -> Neighbours:
    """The k nearest other points of every row of `x` (N, D) by Euclidean distance, the point itself excluded (by
    index, so a duplicate still counts as a neighbour at distance 0). Rows are done in chunks, so memory is
    `chunk_elements` distances, not N x N."""
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k = {k} needs at least k + 1 = {k + 1} points, got {n}")
    x = x.float()
    rows = max(1, chunk_elements // n)
    dists, idxs = [], []
    for i in range(0, n, rows):
        j = min(i + rows, n)
        # the direct form, not the matrix-product one: exact distances for close points (the reference's choice)
        d = torch.cdist(x[i:j], x, compute_mode="donot_use_mm_for_euclid_dist")
        d[torch.arange(j - i), torch.arange(i, j)] = float("inf")
        top = d.topk(k, dim=1, largest=False, sorted=True)
        dists.append(top.values)
        idxs.append(top.indices)
    return Neighbours(torch.cat(dists), torch.cat(idxs))


def k_distance(nb: Neighbours) -> torch.Tensor:
    """The distance to the k-th nearest other point."""
    return nb.dist[:, -1]


def lid_mle(nb: Neighbours) -> torch.Tensor:
    """Local intrinsic dimensionality, maximum-likelihood estimate over the k nearest: -k / sum_i log(r_i / r_k)
    (k equidistant neighbours: a sum of 0, a very large LID rather than a division by zero)."""
    ratio = nb.dist / nb.dist[:, -1:]
    return nb.k / (-torch.log(ratio.clamp(min=LOG_FLOOR)).sum(dim=1)).clamp(min=1e-12)


def _finite(scores: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(scores, nan=NAN_SCORE, posinf=NAN_SCORE, neginf=0.0)


def slof(nb: Neighbours) -> torch.Tensor:
    """Simplified local outlier factor: the mean over the k nearest o of k-dist(x) / k-dist(o)."""
    kd = k_distance(nb)
    return _finite((kd[:, None] / kd[nb.idx]).mean(dim=1))


def dao(nb: Neighbours) -> torch.Tensor:
    """Dimensionality-aware outlier score: the mean over the k nearest o of LID(o) * log(k-dist(x) / k-dist(o)),
    i.e. SLOF's ratios weighted by each neighbour's local dimensionality (in the log form the reference computes)."""
    kd, lid = k_distance(nb), lid_mle(nb)
    return _finite((lid[nb.idx] * torch.log(kd[:, None] / kd[nb.idx])).mean(dim=1))


SCORES: dict[str, Callable[[Neighbours], torch.Tensor]] = {"k_distance": k_distance, "slof": slof, "dao": dao}
SCORE_LABELS = {"k_distance": "k-distance", "slof": "SLOF", "dao": "DAO"}


def score_all(x: torch.Tensor, k: int, names=tuple(SCORES)) -> dict[str, torch.Tensor]:
    """Every score of `names` for the rows of `x`, each among all the other rows."""
    nb = neighbours(x, k)
    return {name: SCORES[name](nb) for name in names}


def score_in_batches(x: torch.Tensor, k: int, batch_size: int, seed: int = 0,
                     names=tuple(SCORES)) -> dict[str, torch.Tensor]:
    """The scores with each point's neighbours drawn from a random batch of `batch_size` points (a seeded partition
    of the rows; the last batch takes the remainder, or joins the one before if it has no more than k points), as
    the reference scores a training loader's batches. `batch_size` 0 or >= N: every other row is a neighbour."""
    n = x.shape[0]
    if batch_size <= 0 or batch_size >= n:
        return score_all(x, k, names)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    starts = list(range(0, n, batch_size))
    if n - starts[-1] <= k:
        starts.pop()
    bounds = starts + [n]
    out = {name: torch.empty(n) for name in names}
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = order[a:b]
        for name, s in score_all(x[rows], k, names).items():
            out[name][rows] = s
    return out


def auroc(scores: torch.Tensor, is_poison: torch.Tensor) -> float | None:
    """Area under the ROC curve of `scores` ranking the positives (`is_poison`) first: the Mann-Whitney U statistic
    with tied scores at their mean rank (a tie counts one half). None when either class is empty."""
    pos = is_poison.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # ranks start at 1: a group's mean rank is first + (count + 1) / 2
    ranks = (first.double() + (counts.double() + 1) / 2)[inverse]
    u = ranks[pos].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def precision_at_rate(scores: torch.Tensor, is_poison: torch.Tensor) -> float | None:
    """The share of poisoned pairs among the n highest scores, n the number of poisoned pairs (so also their
    recall there); ties broken by position. None without poisoned pairs."""
    pos = is_poison.bool()
    n = int(pos.sum())
    if n == 0:
        return None
    top = torch.argsort(scores, descending=True, stable=True)[:n]
    return pos[top].float().mean().item()


def detection_metrics(scores: dict[str, torch.Tensor], is_poison: torch.Tensor) -> dict[str, dict]:
    """{score: {auroc, precision_at_rate, n, n_poison}}, as metrics/detect-<trigger>.json holds per model."""
    n, n_poison = len(is_poison), int(is_poison.bool().sum())
    return {name: {"auroc": auroc(s, is_poison), "precision_at_rate": precision_at_rate(s, is_poison),
                   "n": n, "n_poison": n_poison} for name, s in scores.items()}


def drop_top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """A mask of the rows kept when the round(fraction * N) highest scores are dropped (ties by position)."""
    n_drop = round(fraction * len(scores))
    keep = torch.ones(len(scores), dtype=torch.bool)
    keep[torch.argsort(scores, descending=True, stable=True)[:n_drop]] = False
    return keep
