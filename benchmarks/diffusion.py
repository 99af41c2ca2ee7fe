"""Images/s of the diffusion stage (`clipshield.data.synth.generate`: captions, per-image seeds, the pipeline, resize,
shard writing) against a plain diffusers loop with the same pipeline folder and settings (prompts in batches,
`pipe(...)`, PIL images kept in memory): what clipshield's machinery costs around Stable Diffusion. The two alternate,
after one warm-up call, and each keeps its best round.

    python benchmarks/diffusion.py                      # SD v1.5's architecture, random weights, the paper's settings
    python benchmarks/diffusion.py --arch tiny --n 8 --height 64 --width 64 --steps 2 --batch 4   # a CPU check

No weights are downloaded: the pipeline is built from configs (tests/sd_tiny.py); random weights do the same work per
image as trained ones. On CPU, the sd15 architecture takes minutes per image.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sd_tiny import build_sd15_pipeline, build_tiny_sd_pipeline  # noqa: E402

from clipshield.data import synth  # noqa: E402


def plain_loop(folder: Path, prompts: list[str], a) -> float:
    """Images/s of a plain diffusers loop (loading excluded, as the stage's own figure excludes it)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    with synth._quiet_hf():
        pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    images = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), a.batch):
        with torch.inference_mode():
            out = pipe(prompt=prompts[start:start + a.batch], height=a.height, width=a.width,
                       num_inference_steps=a.steps, guidance_scale=a.guidance,
                       generator=torch.Generator(device).manual_seed(start), output_type="pil")
        images += out.images
    return len(images) / (time.perf_counter() - t0)


def clipshield_stage(folder: Path, out: Path, a) -> float:
    params = {"generator": "diffusion", "model": str(folder), "n": a.n, "seed": 2, "per_shard": a.n,
              "image_size": a.image_size, "height": a.height, "width": a.width, "steps": a.steps,
              "guidance": a.guidance, "batch_size": a.batch, "scheduler": "ddim"}
    return synth.generate(params, out, progress=False)["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["sd15", "tiny"], default="sd15")
    ap.add_argument("--n", type=int, default=64, help="images per round")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224, help="saved side (the paper profile's synth.image_size)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pipeline"
        t0 = time.perf_counter()
        if a.arch == "sd15":
            build_sd15_pipeline(folder, dtype=torch.float16 if torch.cuda.is_available() else torch.float32)
        else:
            build_tiny_sd_pipeline(folder)
        print(f"built {a.arch} pipeline in {time.perf_counter() - t0:.0f} s", flush=True)
        prompts = synth.captions(a.n, 2, synth.load_bank(None))
        plain_loop(folder, prompts[:a.batch], a)  # warm-up: CUDA context, kernels, cuDNN choices
        plain, ours = [], []
        for r in range(a.rounds):
            plain.append(plain_loop(folder, prompts, a))
            ours.append(clipshield_stage(folder, Path(tmp) / f"synth{r}", a))
            print(f"round {r}: plain {plain[-1]:.3f} images/s, clipshield {ours[-1]:.3f} images/s", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{a.arch} on {device}: {a.n} images per round, {a.height}x{a.width}, {a.steps} steps, guidance {a.guidance}, "
          f"batch {a.batch}, DDIM, saved at {a.image_size} px")
    print(f"plain diffusers loop: {max(plain):8.3f} images/s   rounds: {', '.join(f'{x:.3f}' for x in plain)}")
    print(f"clipshield synth:     {max(ours):8.3f} images/s   rounds: {', '.join(f'{x:.3f}' for x in ours)}")
    print(f"ratio clipshield/plain: {max(ours) / max(plain):.3f}")


if __name__ == "__main__":
    main()
