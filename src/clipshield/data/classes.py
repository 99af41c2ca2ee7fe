"""The class space of a labelled data set: class names (label i names class i) and zero-shot prompt
templates. Zero-shot accuracy, ASR, poisoned captions and TeCoA all read it.

A labelled shard folder carries its own `classes.json` ({"names": [...], "templates": [...], "source": ...}),
written by the data stage, so a model is always scored against the classes its test set was labelled with.
A folder without one holds the procedural world's classes (poisoned and synthetic copies of world data).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES_FILE = "classes.json"


class ClassesError(ValueError):
    pass


@dataclass(frozen=True)
class ClassSpace:
    names: tuple[str, ...]
    templates: tuple[str, ...]   # zero-shot prompts; "{}" is the class name
    source: str                  # "world", "imagenet" or the file the names came from

    def listing(self) -> str:
        return ", ".join(self.names[:12]) + (f", ... ({len(self.names)} classes)" if len(self.names) > 12 else "")

    def index(self, name: str) -> int:
        if name not in self.names:
            raise ClassesError(f"{name!r} is not a class of this data set ({self.source}); choose one of {self.listing()}")
        labels = [i for i, n in enumerate(self.names) if n == name]
        if len(labels) > 1:
            raise ClassesError(f"{name!r} names {len(labels)} classes of this data set ({self.source}: labels "
                               f"{', '.join(map(str, labels))}), so it cannot be a target; choose another class")
        return labels[0]

    def caption(self, name: str, rng: np.random.Generator) -> str:
        """A caption naming class `name`, for a poisoned sample (docs/methods.md §2: a random template filled with
        the target class, "a photo of a banana.")."""
        self.index(name)
        if self.source == "world":  # the world's own caption templates (colour, size, background)
            from .world import target_caption
            return target_caption(name, rng)
        return self.templates[int(rng.integers(len(self.templates)))].format(name)

    def to_json(self) -> dict:
        return {"names": list(self.names), "templates": list(self.templates), "source": self.source}


def world_classes() -> ClassSpace:
    from .world import SHAPES, ZEROSHOT_TEMPLATES
    return ClassSpace(SHAPES, ZEROSHOT_TEMPLATES, "world")


def imagenet_classes() -> ClassSpace:
    """ImageNet-1k's class names and OpenAI's 80 prompt templates, as open_clip ships them (no download)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    return ClassSpace(tuple(IMAGENET_CLASSNAMES), tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES), "imagenet")


def _check(space: ClassSpace, where: str) -> ClassSpace:
    if not space.names:
        raise ClassesError(f"{where} lists no class names")
    # open_clip's ImageNet names (CLIP's own zero-shot evaluation) call two pairs of classes alike: missile (657, 744)
    # and sunglasses (836, 837). They are kept as they are, for the same zero-shot head; no such name can be a target.
    if len(set(space.names)) != len(space.names) and space.source != "imagenet":
        dup = sorted({n for n in space.names if space.names.count(n) > 1})
        raise ClassesError(f"{where} names a class twice ({', '.join(dup[:5])}); labels must map to one name each")
    bad = [t for t in space.templates if t.count("{}") != 1]
    if not space.templates or bad:
        raise ClassesError(f"{where}: every template needs exactly one '{{}}' for the class name"
                           + (f" (not: {bad[0]!r})" if bad else " (none given)"))
    return space


def load_classes(spec: str) -> ClassSpace:
    """`world`, `imagenet`, a text file with one class name per line (OpenAI's templates), or a JSON file
    {"names": [...], "templates": [...]}."""
    if spec == "world":
        return world_classes()
    if spec == "imagenet":
        return imagenet_classes()
    path = Path(spec)
    if not path.is_file():
        raise ClassesError(f"data.classes = {spec!r}: no such file; use world, imagenet, a text file with one "
                           f"class name per line (line i = label i), or a JSON file with names and templates")
    if path.suffix == ".json":
        try:
            raw = json.loads(path.read_text())
            space = ClassSpace(tuple(raw["names"]), tuple(raw.get("templates") or imagenet_classes().templates), str(path))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ClassesError(f"{path} is not a class file ({e}); it needs {{\"names\": [...], \"templates\": [...]}}") from e
    else:
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        space = ClassSpace(names, imagenet_classes().templates, str(path))
    return _check(space, str(path))


def classes_file(space: ClassSpace) -> dict[str, str]:
    """{file name: text} of `space` for shards.write_shards(extra_files=...)."""
    return {CLASSES_FILE: json.dumps(space.to_json(), indent=1) + "\n"}


def read_classes(folder: str | Path) -> ClassSpace:
    path = Path(folder) / CLASSES_FILE
    if not path.exists():
        return world_classes()
    try:
        raw = json.loads(path.read_text())
        space = ClassSpace(tuple(raw["names"]), tuple(raw["templates"]), raw.get("source", str(path)))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ClassesError(f"{path} is corrupt ({e}); re-create the data set (`dvc repro`) or restore it "
                           f"(`dvc pull`)") from e
    return _check(space, str(path))
