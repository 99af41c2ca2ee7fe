"""Which term of a cleaning objective costs image->text retrieval: clean the backdoored model with one term switched
off at a time (same seed, data order and budget as the clean stage), then score each model as the metrics do and
with the diagnostics of benchmarks/retrieval_bias.py.

Variants (`--variant`, repeatable; each trains once, in memory):
  start              the start model, untrained
  par                PAR as objectives/par.py trains it
  par-no-st          PAR without the text push S_T
  par-no-si          PAR without the image push S_I
  finetune           PAR without either push (the finetune method)
  par-scale          PAR with the logit scale trained (capped at 100), as CleanCLIP trains it
  cleanclip          CleanCLIP as objectives/cleanclip.py trains it
  cleanclip-no-text  CleanCLIP without the in-modal text term
  cleanclip-no-image CleanCLIP without the in-modal image term
  cleanclip-clip     CleanCLIP without either in-modal term (the CLIP loss, scale trained, batch norm in train mode)
  cleanclip-fixed    CleanCLIP with the logit scale fixed at the start model's value

Columns: i2t/t2i R@5 as `evaluation.recall_at_k` counts them (a retrieved caption is right only when it is the same
string as the image's own); `i2t any` counts a caption right when it describes the image (any of the world's
templates filled with the image's colour, shape, size and background); `i2t -off` is i2t after subtracting each
caption's mean similarity over all images; `tmpl` is the spread (max - min) over templates of the templates' mean
caption offset; |img|, |txt| the length of the mean normalised embedding; `scale` the logit scale after training;
`top-1 wrong`: per attribute, the share of images whose first retrieved caption names it wrongly (of those naming it).

    cd <a run with models/ and data/> && python <repo>/benchmarks/retrieval_ablation.py \\
        --start models/backdoor-blended_stripes-s0 --variant start --variant par --variant par-no-st
"""
from __future__ import annotations

import argparse
import itertools
import math
import re
import time

import torch
import torch.nn.functional as F

from clipshield.data import shards
from clipshield.data.world import WORLDS
from clipshield.evaluation import encode_images, encode_texts, evaluate_model, recall_at_k
from clipshield.models import frozen_copy, load
from clipshield.objectives import build_objective
from clipshield.objectives.cleanclip import CleanClipObjective, inmodal_loss
from clipshield.objectives.clip import clip_loss, logit_scale_of
from clipshield.objectives.par import ParObjective
from clipshield.training import TrainConfig, train


class ParAblation(ParObjective):
    """PAR with each push switchable, and optionally the logit scale trained."""

    def __init__(self, use_si: bool = True, use_st: bool = True, train_scale: bool = False):
        super().__init__()
        self.use_si, self.use_st = use_si, use_st
        self.fix_logit_scale = not train_scale

    def loss(self, f, clip):
        scale = logit_scale_of(clip, self.fixed_scale)
        l_clip = clip_loss(f["img"], f["txt"], scale)
        s_i = (f["img"] - f["img0"]).pow(2).sum(-1).mean()
        s_t = (f["txt"] - f["txt0"]).pow(2).sum(-1).mean()
        pert = 0.5 * (self.use_si * (s_i <= self.eps).float() * s_i + self.use_st * (s_t <= self.eps).float() * s_t)
        return l_clip - pert, {"clip_loss": l_clip.detach(), "s_i": s_i.detach(), "s_t": s_t.detach()}


class CleanClipAblation(CleanClipObjective):
    def __init__(self, use_img: bool = True, use_txt: bool = True, fixed_scale: bool = False):
        super().__init__()
        self.use_img, self.use_txt = use_img, use_txt
        self.fix_logit_scale = fixed_scale

    def loss(self, f, clip):
        scale = logit_scale_of(clip, self.fixed_scale)
        l_clip = clip_loss(f["img"], f["txt"], scale)
        l_img = inmodal_loss(f["img"], f["img_aug"], scale)
        l_txt = inmodal_loss(f["txt"], f["txt_aug"], scale)
        loss = l_clip + self.weight * (self.use_img * l_img + self.use_txt * l_txt) / 2
        return loss, {"clip_loss": l_clip.detach(), "logit_scale": float(scale.detach())}


VARIANTS = {
    "par": lambda: build_objective("par"),
    "par-no-st": lambda: ParAblation(use_st=False),
    "par-no-si": lambda: ParAblation(use_si=False),
    "finetune": lambda: build_objective("finetune"),
    "par-scale": lambda: ParAblation(train_scale=True),
    "cleanclip": lambda: build_objective("cleanclip"),
    "cleanclip-no-text": lambda: CleanClipAblation(use_txt=False),
    "cleanclip-no-image": lambda: CleanClipAblation(use_img=False),
    "cleanclip-clip": lambda: CleanClipAblation(use_img=False, use_txt=False),
    "cleanclip-fixed": lambda: CleanClipAblation(fixed_scale=True),
}


def clean(start: str, objective, data: str, a) -> tuple:
    clip = load(start)
    torch.manual_seed(a.seed)
    frozen = frozen_copy(clip) if objective.needs_frozen else None
    cfg = TrainConfig(steps=a.steps, lr=a.lr, warmup=0, schedule="cosine", weight_decay=1e-4, grad_clip=1.0,
                      seed=a.seed, log_every=max(1, a.steps // 5))
    batches = lambda s: shards.iter_batches(data, a.batch, shuffle=2000, seed=a.seed, start=s, uint8=True)
    result = train(clip, objective, batches, cfg, frozen=frozen, description=objective.name)
    return clip, result


def descriptions(meta: dict, world) -> set[str]:
    """Every caption the world can write for this image (one per template)."""
    return {t.format(colour=meta["colour"], shape=meta["label"], size=meta["size"], background=meta["background"])
            for t in world.templates}


def parse(caption: str, world) -> tuple[int, dict]:
    """(template index, the attributes the caption names); (-1, {}) for a caption of no template."""
    for i, t in enumerate(world.templates):
        pattern = re.escape(t)
        for k in ("colour", "shape", "size", "background"):
            pattern = pattern.replace(re.escape("{" + k + "}"), f"(?P<{k}>[a-z]+)")
        m = re.fullmatch(pattern, caption)
        if m:
            return i, m.groupdict()
    return -1, {}


def template_of(caption: str, world) -> int:
    return parse(caption, world)[0]


def diagnostics(clip, samples, world) -> dict:
    images = torch.stack([torch.from_numpy(s["image"]) for s in samples]).permute(0, 3, 1, 2).float().div(255)
    captions = [s["caption"] for s in samples]
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    groups = torch.tensor([ids[c] for c in captions])
    img, txt = encode_images(clip, images), encode_texts(clip, captions)
    r = recall_at_k(img, txt, groups, ks=(1, 5))
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    sim = img @ txt.T
    describes = torch.tensor([[c in d for c in captions] for d in (descriptions(s["meta"], world) for s in samples)])
    exact = groups.view(-1, 1) == groups.view(1, -1)
    top5 = sim.topk(5, dim=1).indices
    offset = sim.mean(dim=0, keepdim=True)
    tmpl = torch.tensor([template_of(c, world) for c in captions])
    tmpl_means = [offset[0, tmpl == k].mean().item() for k in range(len(world.templates)) if (tmpl == k).any()]
    share = torch.bincount(tmpl[top5].flatten(), minlength=len(world.templates)).float() / top5.numel()
    wrong = {k: [0, 0] for k in ("shape", "colour", "size", "background")}  # top-1 caption names it wrongly / names it
    for s, j in zip(samples, top5[:, 0].tolist()):
        truth = {**s["meta"], "shape": s["meta"]["label"]}
        for k, v in parse(captions[j], world)[1].items():
            wrong[k][0] += v != truth[k]
            wrong[k][1] += 1
    return {"i2t_r5": r["i2t_r5"], "t2i_r5": r["t2i_r5"], "i2t_r1": r["i2t_r1"],
            "i2t_any_r5": describes.gather(1, top5).any(1).float().mean().item(),
            "i2t_any_r1": describes.gather(1, top5[:, :1]).any(1).float().mean().item(),
            "i2t_off_r5": exact.gather(1, (sim - offset).topk(5, dim=1).indices).any(1).float().mean().item(),
            "offset_std": offset.std().item(), "tmpl_spread": max(tmpl_means) - min(tmpl_means),
            "tmpl_share": [round(x, 2) for x in share.tolist()],
            "wrong": {k: round(a / max(b, 1), 3) for k, (a, b) in wrong.items()},
            "img_mean": img.mean(0).norm().item(), "txt_mean": txt.mean(0).norm().item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", required=True)
    ap.add_argument("--variant", action="append", required=True, choices=["start", *VARIANTS])
    ap.add_argument("--data", default="data/synth", help="the cleaning pairs")
    ap.add_argument("--test", default="data/test")
    ap.add_argument("--world", default="base", help="the test set's world (its templates, for `i2t any`)")
    ap.add_argument("--trigger", default="blended_stripes")
    ap.add_argument("--alpha", type=float, default=0.12, help="the trigger's strength (attack.options)")
    ap.add_argument("--target", default="square")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1000, help="retrieval subset (eval.retrieval_n)")
    ap.add_argument("--test-n", type=int, default=2000, help="images for top-1 and ASR (eval.test_n)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    world = WORLDS[a.world]
    samples = list(itertools.islice(shards.iter_samples(a.test), a.n))
    test = shards.EvalSet(a.test, limit=a.test_n)
    print(f"{'variant':20s} {'top1':>6s} {'ASR':>6s} {'i2t@5':>6s} {'t2i@5':>6s} {'i2t@1':>6s} {'any@5':>6s} "
          f"{'any@1':>6s} {'-off@5':>6s} {'offstd':>7s} {'tmpl':>6s} {'|img|':>6s} {'|txt|':>6s} {'scale':>6s} "
          f"{'S_I':>5s} {'S_T':>5s} {'sec':>5s}  top-5 share per template", flush=True)
    for v in a.variant:
        t0 = time.time()
        logs: dict = {}
        if v == "start":
            clip = load(a.start)
        else:
            clip, result = clean(a.start, VARIANTS[v](), a.data, a)
            logs = result.final_logs
        m = evaluate_model(clip, test, triggers={a.trigger: {"alpha": a.alpha}}, target=a.target, retrieval_n=a.n)
        d = diagnostics(clip, samples, world)
        scale = min(math.exp(float(clip.model.logit_scale.detach())), 100.0)
        f = lambda k: f"{logs[k]:5.2f}" if k in logs else f"{'-':>5s}"
        print(f"{v:20s} {m['zeroshot_top1']:6.3f} {m['asr']:6.3f} {d['i2t_r5']:6.3f} {d['t2i_r5']:6.3f} "
              f"{d['i2t_r1']:6.3f} {d['i2t_any_r5']:6.3f} {d['i2t_any_r1']:6.3f} {d['i2t_off_r5']:6.3f} "
              f"{d['offset_std']:7.4f} {d['tmpl_spread']:6.3f} {d['img_mean']:6.3f} {d['txt_mean']:6.3f} "
              f"{scale:6.1f} {f('s_i')} {f('s_t')} {time.time() - t0:5.0f}  {d['tmpl_share']}  top-1 wrong {d['wrong']}", flush=True)
        assert abs(m["i2t_r5"] - d["i2t_r5"]) < 1e-6, (m["i2t_r5"], d["i2t_r5"])


if __name__ == "__main__":
    main()
