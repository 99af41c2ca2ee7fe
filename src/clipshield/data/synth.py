"""Synthetic image-text pairs (PAR's cleaning data): captions from a concept bank, images from the
procedural world (tiny profile) or a diffusers StableDiffusionPipeline (paper profile).

Everything is a pure function of (params, i): caption i depends only on (seed, i), the diffusion
noise of image i comes from its own generator seeded with `seed * 1_000_003 + i`, so image i is the
same whatever the batch size, the shard size or the number of ranks. `generate` writes
`synth-%06d.tar` shards plus `sizes.json` in the format of `clipshield.data.shards`; it resumes
(complete shards are kept) and splits shards over ranks (shard k belongs to rank k % world_size).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tarfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

from clipshield.data.shards import DataError, image_format_for, write_shard, write_sizes
from clipshield.params import ParamsError, parse_synth
from clipshield.data import world as world_code
from clipshield.data.world import SHAPES, get_world, render

BANK_PATH = Path(__file__).with_name("concepts.yaml")
SHARD_PREFIX = "synth"
IMAGE_SEED_STRIDE = 1_000_003
_CAPTION_STREAM = 0x5359  # separates the caption RNG stream from world.render's [seed, index]



# --------------------------------------------------------------------------------------------------
# Concept bank and captions
# --------------------------------------------------------------------------------------------------

def _bank_error(source: str, msg: str) -> ValueError:
    return ValueError(f"concept bank {source}: {msg}")


def check_bank(bank: dict, source: str = "<dict>") -> dict:
    """Validate a concept bank (see concepts.yaml for the rules); returns it unchanged."""
    if not isinstance(bank, dict):
        raise _bank_error(source, "must be a mapping with classes, concepts, attributes, colours, "
                                  "materials, settings, templates and class_fraction")
    lists = ("classes", "concepts", "attributes", "colours", "materials", "settings", "templates")
    for key in lists:
        items = bank.get(key)
        if not isinstance(items, list) or not items or not all(isinstance(s, str) and s.strip() for s in items):
            raise _bank_error(source, f"'{key}' must be a non-empty list of strings")
        if len(set(items)) != len(items):
            raise _bank_error(source, f"'{key}' has duplicate entries")
    frac = bank.get("class_fraction")
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
        raise _bank_error(source, "'class_fraction' must be a number in [0, 1]")
    for t in bank["templates"]:
        if "{subject}" not in t:
            raise _bank_error(source, f"template {t!r} lacks {{subject}}")
        try:
            t.format(subject="x", setting="y")
        except (KeyError, IndexError, ValueError) as e:
            raise _bank_error(source, f"template {t!r} may only use {{subject}} and {{setting}} ({e})") from e
    patterns = [(c, re.compile(r"\b" + re.escape(c.lower()) + r"\b")) for c in bank["classes"]]
    for key in lists[1:]:
        for s in bank[key]:
            for c, pat in patterns:
                if pat.search(s.lower()):
                    raise _bank_error(source, f"'{key}' entry {s!r} names the class {c!r}; captions of "
                                              f"class -1 must not name a class: reword or remove it")
    return bank


@lru_cache(maxsize=8)
def _load_bank_cached(path: str, mtime_ns: int) -> dict:
    try:
        bank = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise _bank_error(path, f"is not valid YAML ({e})") from e
    return check_bank(bank, path)


def load_bank(path: str | Path | None = None) -> dict:
    """The concept bank in `path` (default: the packaged concepts.yaml), validated (cached; do not
    mutate the returned dict)."""
    path = Path(path) if path is not None else BANK_PATH
    if not path.is_file():
        raise ValueError(f"concept bank {path} does not exist; set synth.concepts to a YAML file like "
                         f"{BANK_PATH} (or leave it out for the default bank)")
    return _load_bank_cached(str(path), path.stat().st_mtime_ns)


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def caption(seed: int, index: int, bank: dict | None = None) -> tuple[str, dict]:
    """Caption `index` under `seed`: (text, {"class", "label"}). Pure: depends only on (seed, index, bank).

    "class" is the index into bank["classes"] (= world.SHAPES for the default bank) of the class the
    caption names, or -1 when its subject is a general concept; "label" is the subject noun.
    """
    bank = bank if bank is not None else load_bank()
    rng = np.random.default_rng([int(seed), int(index), _CAPTION_STREAM])
    # A fixed number of draws in a fixed order, whatever branch is taken.
    u_class, u_attr, u_colour, u_material = rng.random(4)
    i_class, i_concept, i_attr, i_colour, i_material, i_setting, i_template = (
        int(rng.integers(len(bank[k]))) for k in
        ("classes", "concepts", "attributes", "colours", "materials", "settings", "templates"))
    if u_class < bank["class_fraction"]:
        cls, noun = i_class, bank["classes"][i_class]
    else:
        cls, noun = -1, bank["concepts"][i_concept]
    words = []
    if u_attr < 0.4:
        words.append(bank["attributes"][i_attr])
    if u_colour < 0.5:
        words.append(bank["colours"][i_colour])
    if u_material < 0.2:
        words.append(bank["materials"][i_material])
    subject = _article(" ".join(words + [noun]))
    text = bank["templates"][i_template].format(subject=subject, setting=bank["settings"][i_setting])
    text = re.sub(r"\s+", " ", text).strip()
    return text, {"class": cls, "label": noun}


def captions(n: int, seed: int, bank: dict | None = None) -> list[str]:
    """The first n captions under `seed`; caption i depends only on (seed, i)."""
    bank = bank if bank is not None else load_bank()
    return [caption(seed, i, bank)[0] for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------

def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_params(params: dict | None) -> dict:
    """The `synth:` params checked against the schema (clipshield.params.SynthParams) with defaults filled in, and
    the concept bank they name; raises ParamsError listing every problem."""
    s, problems = parse_synth(params)
    if problems:
        raise ParamsError("; ".join(problems))
    p = dataclasses.asdict(s)
    if p["generator"] == "diffusion":
        load_bank(p["concepts"])
    return p


def _generator_meta(p: dict) -> dict:
    """What the content of a sample depends on besides (seed, index): recorded in every sample's
    metadata, so a resumed run never keeps shards made with other settings."""
    if p["generator"] == "procedural":
        return {"name": "procedural", "world": p["world"], "image_size": p["image_size"],
                "renderer": renderer_digest()}
    path = Path(p["model"]).expanduser()
    model = path.resolve().name if path.is_dir() else p["model"]
    return {"name": "diffusion", "model": model, "height": p["height"], "width": p["width"],
            "steps": p["steps"], "guidance": p["guidance"], "scheduler": p["scheduler"],
            "image_size": p["image_size"]}


@lru_cache(maxsize=1)
def renderer_digest() -> str:
    """The procedural renderer's code (data/world.py, hashed): DVC reruns the stage when it changes, and the
    resume must not then keep shards the old code drew (cheap to redraw: a second per 800 images)."""
    return hashlib.sha256(Path(world_code.__file__).read_bytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------

def shard_name(k: int) -> str:
    return f"{SHARD_PREFIX}-{k:06d}.tar"


def sample_key(i: int) -> str:
    return f"{i:09d}"


def _shard_range(p: dict, k: int) -> range:
    return range(k * p["per_shard"], min((k + 1) * p["per_shard"], p["n"]))


def _expected_meta(p: dict, i: int, bank: dict | None, gen: dict) -> dict:
    """Metadata fields of sample i that are known without generating it (checked on resume)."""
    meta = {"seed": p["seed"], "index": i, "generator": gen}
    if p["generator"] == "diffusion":
        text, cap = caption(p["seed"], i, bank)
        meta.update(cap, prompt=text, source="diffusion")
    else:
        meta["source"] = f"procedural-{p['world']}"
    return meta


def shard_complete(path: str | Path, p: dict, k: int, bank: dict | None = None) -> bool:
    """Whether shard k exists, is readable, holds exactly its expected samples and was made with
    these settings (checked through each sample's metadata; images are not decoded)."""
    path = Path(path)
    if not path.is_file():
        return False
    gen = _generator_meta(p)
    expected = {sample_key(i): _expected_meta(p, i, bank, gen) for i in _shard_range(p, k)}
    image_ext = image_format_for(max(_saved_size(p)) if p["generator"] == "diffusion" else p["image_size"])
    want = {f"{key}.{ext}" for key in expected for ext in ("json", image_ext, "txt")}
    try:
        size = path.stat().st_size
        with tarfile.open(path) as tf:
            members = tf.getmembers()
            if len(members) != len(want) or {m.name for m in members} != want:
                return False
            for m in members:
                if not m.isfile() or m.size == 0 or m.offset_data + m.size > size:
                    return False
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    exp = expected[m.name[:-5]]
                    if any(meta.get(key) != value for key, value in exp.items()):
                        return False
    except (OSError, tarfile.TarError, ValueError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------------

def _procedural_samples(p: dict, indices: range, gen: dict, advance) -> Iterator[tuple]:
    world = get_world(p["world"])
    for i in indices:
        img, text, m = render(world, p["seed"], i, p["image_size"])
        meta = {"class": m["class"], "label": m["label"], "source": m["source"], "seed": p["seed"],
                "index": i, "prompt": text, "generator": gen}
        advance(1)
        yield sample_key(i), img, text, meta


def _saved_size(p: dict) -> tuple[int, int]:
    """(width, height) of saved images: image_size square, or shorter side = image_size."""
    w, h, s = p["width"], p["height"], p["image_size"]
    if w == h:
        return s, s
    scale = s / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _device() -> "Any":
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    return torch.device("cuda", local)


@contextlib.contextmanager
def _quiet_hf():
    """Silence diffusers/transformers loading bars (our own bar is on stderr)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    states = [(m, m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    verbosity = dlog.get_verbosity()
    for m, _ in states:
        m.disable_progress_bar()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(verbosity)
        for m, enabled in states:
            if enabled:
                m.enable_progress_bar()


def load_pipeline(p: dict):
    """The StableDiffusionPipeline of synth.model on the best device (fp16 on CUDA, fp32 on CPU)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    device = _device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = p["model"]
    path = Path(model).expanduser()
    local = path.is_dir()
    try:
        with _quiet_hf():
            pipe = StableDiffusionPipeline.from_pretrained(
                str(path) if local else model, dtype=dtype, local_files_only=_hub_offline() or local,
                safety_checker=None, requires_safety_checker=False)
    except Exception as e:  # hub, file and config errors come in many types: one clear line
        if local:
            where = f"folder {path}"
        else:
            where = (f"{model!r}: it is not a local folder, and as a hub id it is not in the local cache "
                     f"(HF_HUB_OFFLINE is set)" if _hub_offline() else f"hub id {model!r}")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"synth.model: cannot load a StableDiffusionPipeline from {where} ({first}); "
                         f"fix synth.model or download the model first") from e
    if p["scheduler"] == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _diffusion_samples(p: dict, indices: range, gen: dict, bank: dict, pipe, advance) -> Iterator[tuple]:
    import torch
    from PIL import Image

    size = _saved_size(p)
    idx = list(indices)
    for start in range(0, len(idx), p["batch_size"]):
        batch = idx[start:start + p["batch_size"]]
        caps = [caption(p["seed"], i, bank) for i in batch]
        # CPU generators: the initial noise of image i is the same on every device and batch.
        gens = [torch.Generator("cpu").manual_seed(p["seed"] * IMAGE_SEED_STRIDE + i) for i in batch]
        with torch.inference_mode():
            out = pipe(prompt=[c[0] for c in caps], height=p["height"], width=p["width"],
                       num_inference_steps=p["steps"], guidance_scale=p["guidance"], generator=gens,
                       output_type="pil")
        advance(len(batch))
        for i, (text, cap), im in zip(batch, caps, out.images):
            im = im.convert("RGB")
            if im.size != size:
                im = im.resize(size, Image.BICUBIC)
            meta = {**cap, "source": "diffusion", "seed": p["seed"], "index": i, "prompt": text,
                    "generator": gen}
            yield sample_key(i), np.asarray(im), text, meta


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------

def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def _finalise(out_dir: Path, p: dict, bank: dict | None, num_shards: int) -> bool:
    """If every shard is complete: remove stray synth shards/partials and write sizes.json."""
    names = [shard_name(k) for k in range(num_shards)]
    if not all(shard_complete(out_dir / names[k], p, k, bank) for k in range(num_shards)):
        return False
    keep = set(names)
    for f in out_dir.glob(f"{SHARD_PREFIX}-*.tar*"):
        if f.name not in keep:
            f.unlink(missing_ok=True)
    sizes = {names[k]: len(_shard_range(p, k)) for k in range(num_shards)}
    with contextlib.suppress(OSError, ValueError):
        if json.loads((out_dir / "sizes.json").read_text()) == sizes:
            return True  # already there: leave the file untouched
    write_sizes(out_dir, sizes)
    return True


def generate(params: dict, out_dir: str | Path, rank: int = 0, world_size: int = 1,
             progress: bool = True) -> dict:
    """Generate the synthetic pair set described by `params` (the `synth:` section) into `out_dir`.

    Writes `synth-%06d.tar` shards (shard k: samples [k*per_shard, (k+1)*per_shard)) and, once all
    shards exist, `sizes.json`. Complete shards made with the same settings are kept (resume);
    rank r makes the shards k with k % world_size == r. Returns a summary dict.
    """
    p = resolve_params(params)
    if isinstance(rank, bool) or not isinstance(rank, int) or not isinstance(world_size, int) \
            or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r}, world_size={world_size!r}: need 0 <= rank < world_size "
                         f"(set RANK and WORLD_SIZE, e.g. through torchrun)")
    out_dir = Path(out_dir)
    bank = load_bank(p["concepts"]) if p["generator"] == "diffusion" else None
    gen = _generator_meta(p)
    num_shards = math.ceil(p["n"] / p["per_shard"])
    mine = [k for k in range(num_shards) if k % world_size == rank]
    todo = [k for k in mine if not shard_complete(out_dir / shard_name(k), p, k, bank)]
    if todo:  # the folder is about to change: it is not a complete data set until the end
        (out_dir / "sizes.json").unlink(missing_ok=True)

    pipe = load_pipeline(p) if todo and p["generator"] == "diffusion" else None
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(len(_shard_range(p, k)) for k in todo)
    done = 0
    bar = progress_context(f"synth rank {rank}/{world_size}" if world_size > 1 else "synth", total, progress)
    t0 = time.perf_counter()
    with bar as bar_advance:
        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar_advance(n, images_per_s=done / max(time.perf_counter() - t0, 1e-9))

        for k in todo:
            indices = _shard_range(p, k)
            if pipe is None:
                samples = _procedural_samples(p, indices, gen, advance)
            else:
                samples = _diffusion_samples(p, indices, gen, bank, pipe, advance)
            count = write_shard(out_dir / shard_name(k), samples)
            if count != len(indices):  # pragma: no cover - defensive
                raise DataError(f"shard {shard_name(k)} got {count} samples, expected {len(indices)}")
    seconds = time.perf_counter() - t0

    dist = _dist()
    if dist is not None:
        dist.barrier()
        if rank == 0:
            _finalise(out_dir, p, bank, num_shards)
        dist.barrier()
        complete = (out_dir / "sizes.json").is_file()
    else:
        complete = _finalise(out_dir, p, bank, num_shards)
    return {"out_dir": str(out_dir), "generator": p["generator"], "n": p["n"], "shards": num_shards,
            "rank": rank, "world_size": world_size, "mine": len(mine), "generated": len(todo),
            "skipped": len(mine) - len(todo), "images": done, "seconds": round(seconds, 3),
            "images_per_s": round(done / seconds, 3) if done and seconds > 0 else 0.0,
            "complete": complete}


def synth_stage(params: dict, out_dir: str | Path) -> dict:
    """The synth stage: `generate` as this process's rank (RANK / WORLD_SIZE, e.g. from torchrun), then one
    summary line on stdout."""
    r = generate(params, out_dir, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    print(f"synth: rank {r['rank']}/{r['world_size']} {r['generator']} n={r['n']} "
          f"shards={r['shards']} generated={r['generated']} skipped={r['skipped']} "
          f"images={r['images']} ({r['images_per_s']:.3g}/s) "
          f"{'complete: ' + str(Path(out_dir) / 'sizes.json') if r['complete'] else 'waiting for other ranks'}")
    return r


def progress_context(description: str, total: int, enabled: bool = True):
    """ui.progress_bar when enabled, else a no-op context yielding a no-op advance."""
    if enabled and total > 0:
        from clipshield.ui import progress_bar

        return progress_bar(description, total)
    return contextlib.nullcontext(lambda n=1, **fields: None)
