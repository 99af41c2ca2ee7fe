"""webdataset shard I/O: byte-reproducible writing, streaming reading with constant memory.

A data set is a folder of `NAME-000000.tar` shards (per sample KEY.ppm, KEY.png or KEY.jpg, KEY.txt, KEY.json)
and a `sizes.json` mapping shard file name -> sample count; a labelled one also has `classes.json`
(data/classes.py). Folders are written into a temporary
sibling and renamed into place at the end, so an interrupted write never leaves a half data set.
"""
from __future__ import annotations

import io
import itertools
import json
import mmap
import os
import queue
import re
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from ..errors import DataError
from ..files import atomic_path, json_object


# Images up to this side are stored raw (binary PPM: a 15-byte header, then the pixels). Decoding a 32-px PNG
# takes PIL about 70 us, reading raw pixels about 1 us, for a third more bytes: at 128 images per step that
# was 9 ms of a 166 ms training step (benchmarks/train_step.py). Larger images stay PNG: their pixels are big.
RAW_MAX_SIDE = 64


def image_format_for(side: int) -> str:
    """The lossless format images of this side are written in: raw PPM up to RAW_MAX_SIDE px, PNG above."""
    return "ppm" if side <= RAW_MAX_SIDE else "png"


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_ppm(img: np.ndarray) -> bytes:
    h, w = img.shape[:2]
    return b"P6\n%d %d\n255\n" % (w, h) + np.ascontiguousarray(img, np.uint8).tobytes()


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


ENCODERS = {"ppm": encode_ppm, "png": encode_png, "jpg": encode_jpeg}
_PPM_HEADER = re.compile(rb"P6\s(\d+)\s(\d+)\s255\s")  # as encode_ppm writes it; others (comments, 16 bit) go to PIL


def decode_image(data: bytes) -> np.ndarray:
    """Decode an encoded image (PPM, PNG or JPEG) to uint8 HxWx3."""
    header = _PPM_HEADER.match(data)
    if header is not None:
        w, h = int(header.group(1)), int(header.group(2))
        if len(data) - header.end() != w * h * 3:
            raise ValueError(f"a {w}x{h} PPM holds {w * h * 3} pixel bytes, this one {len(data) - header.end()}")
        return np.frombuffer(data, np.uint8, offset=header.end()).reshape(h, w, 3).copy()
    image = Image.open(io.BytesIO(data))
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))


def image_extension(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data.startswith(b"P6"):
        return "ppm"
    raise ValueError("image bytes are neither PPM, PNG nor JPEG")


def write_shard(path: str | Path, samples: Iterable[tuple[str, np.ndarray, str, dict]], image_format: str = "auto") -> int:
    """Write one tar shard of (key, uint8 HxWx3 image or encoded bytes, caption, metadata) samples atomically;
    returns the sample count. Arrays are encoded as `image_format`: auto (lossless, `image_format_for` their
    size: the default), ppm, png, or jpg (imported photographs). Fixed mtime, owner and mode: the same samples
    give the same bytes."""
    if image_format != "auto" and image_format not in ENCODERS:
        raise ValueError(f"image_format {image_format!r}: expected auto, {', '.join(ENCODERS)}")
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = wds.TarWriter(f, mtime=0, user="clipshield", group="clipshield")
        try:
            for key, img, caption, meta in samples:
                if "." in key or key.startswith("/"):
                    raise ValueError(f"sample key {key!r} contains a dot or is absolute; keys are plain names "
                                     f"(webdataset splits keys at dots)")
                if isinstance(img, bytes):  # already encoded
                    data, ext = img, image_extension(img)
                else:
                    ext = image_format_for(max(img.shape[:2])) if image_format == "auto" else image_format
                    data = ENCODERS[ext](img)
                writer.write({"__key__": key, ext: data, "txt": caption.encode(),
                              "json": json.dumps(meta, sort_keys=True).encode()})
                n += 1
        finally:
            writer.close()
    return n


def write_sizes(data_dir: str | Path, sizes: dict[str, int]) -> None:
    (Path(data_dir) / "sizes.json").write_text(json.dumps(sizes, indent=1, sort_keys=True) + "\n")


def write_shards(samples: Iterable[tuple[str, np.ndarray, str, dict]], out_dir: str | Path,
                 prefix: str = "shard", per_shard: int = 5000, image_format: str = "auto",
                 extra_files: dict[str, str] | None = None) -> dict[str, int]:
    """Write a whole data set into `out_dir` atomically (a temp folder renamed into place), with
    `extra_files` {name: text} beside the shards (e.g. classes.json)."""
    sizes: dict[str, int] = {}
    it = iter(samples)
    with atomic_path(out_dir) as tmp:  # an existing data set at out_dir stays as it was until this one is complete
        tmp.mkdir(parents=True)
        while chunk := list(itertools.islice(it, per_shard)):
            name = f"{prefix}-{len(sizes):06d}.tar"
            sizes[name] = write_shard(tmp / name, chunk, image_format)
        if not sizes:
            raise DataError(f"no samples to write to {out_dir}")
        write_sizes(tmp, sizes)
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text)
    from ..ui import wrote
    wrote(out_dir)
    return sizes


def shard_paths(data_dir: str | Path) -> list[str]:
    """The shard files of a data set, checked against its sizes.json."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data set {data_dir} does not exist; run the stage that makes it "
                        f"(`dvc repro`) or point the param at an existing shard folder")
    sizes_file = data_dir / "sizes.json"
    if not sizes_file.exists():
        raise DataError(f"{data_dir} has no sizes.json; it is not a complete clipshield data set "
                        f"(re-create it with `dvc repro` or `clipshield data`)")
    try:
        sizes = json.loads(sizes_file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{sizes_file} is corrupt ({e}); re-create the data set (`dvc repro`) "
                        f"or restore it (`dvc pull`)") from e
    missing = [n for n in sizes if not (data_dir / n).is_file()]
    if missing:
        raise DataError(f"{data_dir} lacks shards listed in sizes.json: {missing[:3]}; "
                        f"re-create it (`dvc repro`) or restore it (`dvc pull`)")
    if sum(sizes.values()) == 0:
        raise DataError(f"{data_dir} holds no samples; re-create it (`dvc repro`) or restore it (`dvc pull`)")
    return [str(data_dir / n) for n in sorted(sizes)]


def shard_sizes(data_dir: str | Path) -> dict[str, int]:
    """sizes.json as {shard path: sample count}, after the checks of `shard_paths`."""
    paths = shard_paths(data_dir)
    sizes = json.loads((Path(data_dir) / "sizes.json").read_text())
    return {p: sizes[Path(p).name] for p in paths}


def num_samples(data_dir: str | Path) -> int:
    return sum(shard_sizes(data_dir).values())


def _corrupt(shard: str, why: str) -> DataError:
    return DataError(f"corrupt or unreadable shard {shard}: {why}; delete the data set and re-create it "
                     f"(`dvc repro`) or restore it (`dvc pull`)")


_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split (base_plus_ext)
_META = re.compile(r"__[^/]*__($|/)")  # members webdataset skips (e.g. __index__)
_REGULAR, _DIRECTORY = (b"0", b"\0"), b"5"


def tar_files(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, content) of every regular file of a tar, in order.

    A plain ustar reader over a memory map: tarfile's header parsing was 55% of the loading time of a
    training batch. Archives with other header kinds (pax, GNU long names) go through tarfile."""
    shard = Path(path).name
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise _corrupt(shard, "the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            members, offset, end = [], 0, len(data)
            while offset + 512 <= end:
                header = data[offset:offset + 512]
                if header == bytes(512):
                    break  # end-of-archive block
                if sum(header) - sum(header[148:156]) + 256 != _octal(header[148:156], shard):
                    raise _corrupt(shard, f"bad tar header checksum at byte {offset}")
                kind, size = header[156:157], _octal(header[124:136], shard)
                if kind not in _REGULAR and kind != _DIRECTORY:
                    yield from _tar_files_slow(path)
                    return
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")  # as tarfile
                prefix = header[345:500].split(b"\0", 1)[0]
                if header[257:265] == b"ustar\x0000" and prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
                if offset + 512 + size > end:
                    raise _corrupt(shard, f"truncated inside member {name}")
                if kind in _REGULAR:
                    members.append((name, offset + 512, size))
                offset += 512 + -(-size // 512) * 512
            else:
                if offset != end:
                    raise _corrupt(shard, f"truncated inside a header at byte {offset}")
            for name, start, size in members:
                yield name, data[start:start + size]


def _octal(field: bytes, shard: str) -> int:
    if field[:1] and field[0] & 0x80:  # base-256 (GNU): not written by any tool we read
        raise _corrupt(shard, "a member larger than 8 GiB")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _corrupt(shard, f"not a tar file (header field {field!r})") from None


def _tar_files_slow(path: str) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(path) as tf:
            for member in tf:
                if member.isreg():
                    yield member.name, tf.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise _corrupt(Path(path).name, str(e)) from e


def shard_samples(urls: Iterable[dict]) -> Iterator[dict]:
    """webdataset stage: {"url"} -> samples {"__key__", "__url__", extension: bytes}, grouped as webdataset
    groups them (consecutive members with the same key; samples never span two shards)."""
    for source in urls:
        url, sample = source["url"], None
        for name, content in tar_files(url):
            match = _KEY_EXT.match(name)
            if match is None or _META.match(name):
                continue
            key, ext = match.group(1), match.group(2).lower()
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if ext in sample:
                raise _corrupt(Path(url).name, f"{name} appears twice")
            sample[ext] = content
        if sample is not None:
            yield sample


def iter_samples(data_dir: str | Path, shuffle: int = 0, seed: int = 0, decode: bool = True) -> Iterator[dict]:
    """Stream samples: {"key", "image" (uint8 HxWx3, or the encoded bytes if not `decode`), "caption", "meta"}."""
    expected = shard_sizes(data_dir)
    urls = list(expected)
    # Every rank reads every shard in the same order on purpose (iter_batches gives each rank its slice of
    # every global batch), so N processes see exactly what one process sees. The shuffles are
    # webdataset's, with the arguments wds.WebDataset(shardshuffle=..., seed=...).shuffle(...) passes.
    stages = [wds.SimpleShardList(urls)]
    if shuffle:
        stages += [wds.filters.shuffle(len(urls), seed=seed), shard_samples, wds.filters.shuffle(shuffle, seed=seed)]
    else:
        stages += [shard_samples]
    ds = wds.DataPipeline(*stages)
    seen = dict.fromkeys(urls, 0)
    for s in ds:
        key = s["__key__"]
        if key.startswith("/") or ".." in key.split("/"):
            raise DataError(f"shard {Path(s['__url__']).name} of {data_dir} holds a member named {key!r} (an absolute "
                            f"path or one with '..'): refused, it is not a clipshield data set; re-create it "
                            f"(`dvc repro`) or restore it (`dvc pull`)")
        shard = Path(s["__url__"]).name
        try:
            image = next((s[ext] for ext in ("ppm", "png", "jpg") if ext in s), None)
            if image is None:
                raise KeyError("KEY.ppm, KEY.png or KEY.jpg")
            caption, meta_bytes = s["txt"], s["json"]
        except KeyError as e:
            raise DataError(f"sample {key} in shard {shard} of {data_dir} lacks {e} (a truncated "
                            f"shard?); shards "
                            f"hold KEY.ppm (or .png, .jpg), KEY.txt and KEY.json: re-create (`dvc repro`) or restore (`dvc pull`)") from e
        where, fix = f"sample {key} in shard {shard} of {data_dir}", "re-create the data set (`dvc repro`) or restore it (`dvc pull`)"
        try:
            caption = caption.decode()
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: its caption ({key}.txt) is not UTF-8 text ({e}); {fix}") from e
        meta = json_object(meta_bytes, f"{where}: {key}.json", fix, DataError)
        sample = {"key": key, "image": decode_sample_image(image, where, fix) if decode else image,
                  "caption": caption, "meta": meta, "shard": f"{shard} of {data_dir}"}  # named by errors in collate
        seen[s["__url__"]] = seen.get(s["__url__"], 0) + 1
        if seen[s["__url__"]] > expected.get(s["__url__"], 0):
            raise DataError(f"shard {shard} of {data_dir} holds more samples than its sizes.json says "
                            f"({expected.get(s['__url__'], 0)}; sample {key} is one more): sizes.json is stale or the "
                            f"shard was replaced; re-create the data set (`dvc repro`) or restore it (`dvc pull`)")
        yield sample
    short = {Path(u).name: (seen.get(u, 0), n) for u, n in expected.items() if seen.get(u, 0) != n}
    if short:
        raise DataError(f"shards of {data_dir} hold other sample counts than sizes.json says "
                        f"(read, expected): {short}; a shard is truncated or corrupt: re-create the data set "
                        f"(`dvc repro`) or restore it (`dvc pull`)")


def decode_sample_image(data: bytes, where: str, fix: str) -> np.ndarray:
    try:
        return decode_image(data)
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated or broken file
        why = "not an image format PIL knows" if "cannot identify image file" in str(e) else str(e)
        raise DataError(f"{where}: its image is not a readable PPM, PNG or JPEG ({why}); {fix}") from e


def _sample_array(s: dict) -> np.ndarray:
    if isinstance(s["image"], np.ndarray):
        return s["image"]
    return decode_sample_image(s["image"], f"sample {s['key']} in shard {s.get('shard', '?')}",
                               "re-create the data set (`dvc repro`) or restore it (`dvc pull`)")


def collate(samples: list[dict], pool: ThreadPoolExecutor | None = None, uint8: bool = False) -> dict:
    """One batch: images (B,3,H,W) in [0,1] as float32, or as uint8 0..255 with `uint8` (a quarter of the bytes to
    move to a GPU, converted there: `as_float_images`); with `pool`, decoded by its threads (PIL releases the GIL)."""
    first = _sample_array(samples[0])
    images = np.empty((len(samples), *first.shape), np.uint8)

    def place(i: int) -> None:
        a = first if i == 0 else _sample_array(samples[i])
        if a.shape != first.shape:
            s, s0 = samples[i], samples[0]
            raise DataError(f"sample {s['key']} in shard {s.get('shard', '?')} is {a.shape[1]}x{a.shape[0]} px, but "
                            f"sample {s0['key']} in shard {s0.get('shard', '?')} is {first.shape[1]}x{first.shape[0]}: "
                            f"a data set holds one image size; re-create it (`dvc repro`, or `clipshield data` with "
                            f"data.image_size) or restore it (`dvc pull`)")
        images[i] = a
    for _ in (pool.map if pool is not None else map)(place, range(len(samples))):  # runs `place`, raises its errors
        pass
    chw = torch.from_numpy(images).permute(0, 3, 1, 2)
    return {"images": chw if uint8 else as_float_images(chw), "captions": [s["caption"] for s in samples],
            "labels": torch.tensor([s["meta"].get("class", -1) for s in samples]),
            "keys": [s["key"] for s in samples]}


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 images as float32 in [0,1] (float images pass through unchanged)."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def iter_batches(data_dir: str | Path, batch_size: int, shuffle: int = 2000, seed: int = 0,
                 epochs: int | None = None, drop_last: bool = True, start: int = 0,
                 threads: int = 0, uint8: bool = False) -> Iterator[dict]:
    """Batches of images in [0,1] (B,3,H,W), captions and labels; reshuffled every epoch. With `uint8` the
    images stay uint8 0..255 (the training loop converts them on its device: `as_float_images`).

    `epochs=None` repeats forever (step-based training). Memory is the shuffle buffer of encoded images.
    `start` skips that many batches without decoding them: a resumed run sees exactly the batches
    an uninterrupted one would have seen from there on. Under torchrun every rank reads the same global
    batches and decodes only its own contiguous slice (distributed.local_slice).
    With `threads` > 0, batches are read and decoded by background threads (`threads` decoders) up to two
    batches ahead, while the model trains on the current one: the same batches in the same order. For a GPU,
    whose step is shorter than decoding a batch of 224-px images in one thread; on a few CPU cores the threads
    would only take cores from the model (train.loader_threads: auto).
    """
    if threads <= 0:
        yield from _batches(data_dir, batch_size, shuffle, seed, epochs, drop_last, start, None, uint8)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="clipshield-decode") as pool:
        yield from prefetch(_batches(data_dir, batch_size, shuffle, seed, epochs, drop_last, start, pool, uint8),
                            depth=2)


def _batches(data_dir, batch_size, shuffle, seed, epochs, drop_last, start, pool, uint8) -> Iterator[dict]:
    per_epoch = num_samples(data_dir) // batch_size if drop_last else -(-num_samples(data_dir) // batch_size)
    if per_epoch == 0:
        raise DataError(f"{data_dir} holds fewer samples than one batch ({batch_size}); lower the batch size")
    from ..distributed import local_slice
    mine = local_slice(batch_size)  # under torchrun: this rank's share of every global batch
    epoch, skip = divmod(start, per_epoch)
    while epochs is None or epoch < epochs:
        buf: list[dict] = []
        for s in iter_samples(data_dir, shuffle=shuffle, seed=seed * 100003 + epoch, decode=False):
            buf.append(s)
            if len(buf) == batch_size:
                if skip:
                    skip -= 1
                else:
                    yield collate(buf[mine], pool, uint8)
                buf = []
        if buf and not drop_last:
            yield collate(buf, pool, uint8)
        epoch += 1


def prefetch(items: Iterator, depth: int) -> Iterator:
    """The items of `items`, produced by a background thread up to `depth` ahead of the consumer. An exception
    in the producer is raised here, at the item where it happened; when the consumer stops early, so does the
    producer (within 0.1 s)."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer, who raises it
            put(("error", e))

    worker = threading.Thread(target=produce, name="clipshield-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()


def require_classes(data_dir: str | Path) -> None:
    """An evaluation set must say what its labels mean: refuse a folder without classes.json."""
    from .classes import CLASSES_FILE
    if Path(data_dir).is_dir() and not (Path(data_dir) / CLASSES_FILE).exists():
        raise DataError(f"test set {data_dir} has no {CLASSES_FILE}, so its labels name no classes; re-create it with "
                        f"`clipshield data` (or `dvc repro data`), or write {Path(data_dir) / CLASSES_FILE} as "
                        f'{{"names": [class of label 0, ...], "templates": ["a photo of a {{}}."]}}')


def load_all(data_dir: str | Path, limit: int | None = None, labelled: bool = False) -> dict:
    """The first `limit` samples (in shard order) as one batch, with the folder's class space
    (`classes`), for evaluation sets (with `labelled`, a folder without classes.json is refused)."""
    from .classes import read_classes
    if labelled:
        require_classes(data_dir)
    buf = []
    for s in iter_samples(data_dir):
        buf.append(s)
        if limit is not None and len(buf) >= limit:
            break
    return collate(buf) | {"classes": read_classes(data_dir)}


class EvalSet:
    """A labelled evaluation set read from its shards batch by batch: its first `limit` samples (None: all), in
    shard order, as `load_all` would give them, but never more than one batch in memory.

    `batches(b)` yields collated batches (images, captions, labels, keys) with `start`, the index of their first
    sample; `head(n)` the first n samples as one batch (for the bounded subsets: retrieval, distortion).

    The zero-shot head is the folder's class space, or a cheaper one for quick runs (params `eval.classes`,
    `eval.templates`; not comparable to the papers' numbers): `classes="present"` keeps only the classes that label
    the scored samples (labels renumbered into that list), `templates=N` only the first N prompt templates."""

    def __init__(self, data_dir: str | Path, limit: int | None = None, classes: str = "all", templates: int = 0):
        self.data_dir, self.limit = Path(data_dir), limit
        shard_paths(self.data_dir)  # a missing or broken data set fails here, before any model work
        require_classes(self.data_dir)
        from .classes import ClassSpace, read_classes
        space = read_classes(self.data_dir)
        self._relabel = None
        if classes == "present":
            present = sorted({s["meta"].get("class", -1) for s in itertools.islice(
                iter_samples(self.data_dir, decode=False), len(self))})
            if present[0] < 0 or present[-1] >= len(space.names):
                raise DataError(f"{self.data_dir} holds labels {present[0]}..{present[-1]} outside its "
                                f"{len(space.names)} classes ({space.source}); is it a labelled test set?")
            self._relabel = torch.full((len(space.names),), -1, dtype=torch.long)
            self._relabel[present] = torch.arange(len(present))
            space = ClassSpace(tuple(space.names[i] for i in present), space.templates,
                               f"{space.source}: the {len(present)} classes of its first {len(self)} samples "
                               f"(eval.classes: present)")
        elif classes != "all":
            raise DataError(f"eval.classes = {classes!r}; choose all (the test set's class space) or present")
        if templates:
            space = ClassSpace(space.names, space.templates[:templates], space.source)
        self.classes = space

    def __len__(self) -> int:
        n = num_samples(self.data_dir)
        return n if self.limit is None else min(n, self.limit)

    def _relabelled(self, batch: dict) -> dict:
        return batch if self._relabel is None else batch | {"labels": self._relabel[batch["labels"]]}

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict]:
        limit = min(x for x in (limit, self.limit, num_samples(self.data_dir)) if x is not None)
        buf, start = [], 0
        for s in iter_samples(self.data_dir):
            buf.append(s)
            if len(buf) == batch_size or start + len(buf) == limit:
                yield self._relabelled(collate(buf)) | {"start": start}
                start, buf = start + len(buf), []
                if start == limit:
                    return

    def head(self, n: int) -> dict:
        batch = load_all(self.data_dir, limit=n if self.limit is None else min(n, self.limit))
        return self._relabelled(batch) | {"classes": self.classes}


def tar_members(path: str | Path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()
