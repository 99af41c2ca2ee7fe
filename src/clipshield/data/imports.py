"""Import real data: webdataset shards written by img2dataset (e.g. CC3M: KEY.jpg, KEY.txt, KEY.json) or an
ImageNet-val set in webdataset form (KEY.jpg or .JPEG, KEY.cls holding the label), into clipshield shards.

Images are centre-cropped to a square and resized to data.image_size (bicubic), stored as JPEG; each sample
keeps its caption (or, without one, "a photo of a <class>.") and its class label where the source has one.
Keys are renumbered (webdataset keys must not contain dots); the source's key and shard are kept in the
metadata.
"""
from __future__ import annotations

import glob
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from .classes import ClassSpace
from .shards import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm")  # ppm: clipshield's own small images


def source_shards(spec: str) -> list[str]:
    """The tar files of `spec`: a folder (its *.tar), a brace pattern (`cc3m/{00000..00331}.tar`) or a glob."""
    import braceexpand
    if not spec:
        raise DataError("no source shards given; set data.train_shards / data.test_shards to a folder of .tar "
                        "shards, a brace pattern such as /data/cc3m/{00000..00331}.tar, or a glob")
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.tar"))
    else:
        files = sorted({f for pattern in braceexpand.braceexpand(str(path)) for f in glob.glob(pattern)})
    if not files:
        raise DataError(f"no .tar shards at {spec!r}; point the param at img2dataset's output folder (webdataset "
                        f"format) or a brace pattern of its shards")
    return files


def square_image(data: bytes, size: int) -> np.ndarray:
    """Decode, centre-crop to a square, resize to size x size (bicubic): uint8 HxWx3."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return np.array(img.resize((size, size), Image.Resampling.BICUBIC))


def _label(sample: dict, meta: dict) -> int | None:
    if "cls" in sample:
        return int(sample["cls"].decode().strip())
    for k in ("label", "class"):
        if isinstance(meta.get(k), int):
            return meta[k]
    return None


def _refuse(exn: Exception) -> bool:
    raise DataError(f"cannot read a source shard: {exn}; check that the files are complete webdataset .tar shards") from exn


def external_samples(spec: str, size: int, classes: ClassSpace, prefix: str, labelled: bool,
                     limit: int = 0) -> Iterator[tuple[str, np.ndarray, str, dict]]:
    """(key, image, caption, meta) for the first `limit` samples (0: all) of the shards at `spec`.
    `labelled`: every sample must carry a class label of `classes` (a test set for zero-shot and ASR)."""
    urls = source_shards(spec)
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False, handler=_refuse, nodesplitter=lambda u: u)
    n = 0
    for s in ds:
        where = f"sample {s['__key__']!r} of {Path(s['__url__']).name}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in s), None)
        if ext is None:
            raise DataError(f"{where} has no image ({', '.join(IMAGE_EXTENSIONS)}); members: "
                            f"{sorted(k for k in s if not k.startswith('__'))}")
        meta = json.loads(s["json"]) if "json" in s else {}
        label = _label(s, meta)
        if label is not None and not 0 <= label < len(classes.names):
            raise DataError(f"{where} has label {label}, outside the {len(classes.names)} classes of "
                            f"data.classes ({classes.source}); is data.classes the list these shards are labelled with?")
        if labelled and label is None:
            raise DataError(f"{where} has no class label (KEY.cls, or 'label' in KEY.json); the test set must be "
                            f"labelled for zero-shot accuracy and ASR")
        caption = s["txt"].decode().strip() if "txt" in s else meta.get("caption")
        if not caption:
            if label is None:
                raise DataError(f"{where} has neither a caption (KEY.txt) nor a class label")
            caption = f"a photo of a {classes.names[label]}."
        try:
            image = square_image(s[ext], size)
        except Exception as e:  # PIL raises many kinds
            raise DataError(f"{where}: its image does not decode ({e})") from e
        out = {"source": Path(s["__url__"]).name, "source_key": s["__key__"]}
        if label is not None:
            out |= {"class": label, "name": classes.names[label]}
        yield f"{prefix}{n:08d}", image, caption, out
        n += 1
        if limit and n >= limit:
            break
    if n == 0:
        raise DataError(f"the shards at {spec!r} hold no samples")
