"""Why cleaning costs image->text retrieval but not text->image: a per-caption offset ("hubness").

For every model, on the evaluation's retrieval subset (the first eval.retrieval_n test pairs, exact-caption
matches as `evaluation.recall_at_k` counts them), prints i2t and t2i R@5 as the metrics report them, and i2t R@5
again after subtracting from each caption's similarities their mean over all images. A caption-specific offset
shared by every image leaves t2i unchanged (it is constant along a t2i ranking) but reorders every i2t ranking;
if removing it restores i2t, that offset is what the cleaning added. The offset is each caption's similarity to
the images' mean direction, so the last two columns give the length of the mean of the normalised image (and caption)
embeddings: near 0 when they spread over the sphere, 1 when they all point one way. A diagnostic: the metrics stay
as they are.

    python benchmarks/retrieval_bias.py [--test data/test] [--n 1000] models/backdoor-... models/par-... ...
"""
from __future__ import annotations

import argparse
import itertools

import torch

from clipshield.data import shards
from clipshield.evaluation import encode_images, encode_texts, recall_at_k
from clipshield.models import load


def r5_i2t(sim: torch.Tensor, groups: torch.Tensor) -> float:
    match = groups.view(-1, 1) == groups.view(1, -1)
    return match.gather(1, sim.topk(5, dim=1).indices).any(dim=1).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--test", default="data/test")
    ap.add_argument("--n", type=int, default=1000, help="retrieval subset: the first N test pairs (eval.retrieval_n)")
    a = ap.parse_args()
    samples = list(itertools.islice(shards.iter_samples(a.test), a.n))
    images = torch.stack([torch.from_numpy(s["image"]) for s in samples]).permute(0, 3, 1, 2).float().div(255)
    captions = [s["caption"] for s in samples]
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    groups = torch.tensor([ids[c] for c in captions])
    print(f"{len(samples)} test pairs, {len(ids)} distinct captions")
    print(f"{'model':40s} {'i2t R@5':>8s} {'t2i R@5':>8s} {'i2t, caption offset removed':>28s} {'offset std':>11s} "
          f"{'|mean img|':>10s} {'|mean txt|':>10s}")
    for path in a.models:
        clip = load(path)
        img, txt = encode_images(clip, images), encode_texts(clip, captions)
        r = recall_at_k(img, txt, groups, ks=(5,))
        img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
        sim = img @ txt.T
        offset = sim.mean(dim=0, keepdim=True)  # each caption's mean similarity to all images
        print(f"{path:40s} {r['i2t_r5']:8.3f} {r['t2i_r5']:8.3f} {r5_i2t(sim - offset, groups):28.3f} "
              f"{offset.std().item():11.4f} {img.mean(dim=0).norm().item():10.3f} "
              f"{txt.mean(dim=0).norm().item():10.3f}")


if __name__ == "__main__":
    main()
