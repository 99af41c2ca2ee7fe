"""params.yaml: typed sections with one-line errors for missing, unknown or mistyped keys, and profiles.

A profile (profiles/NAME.yaml) is a partial params file; `apply_profile` deep-merges it into params.yaml.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml


class ParamsError(ValueError):
    pass


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found; run from the project root (where params.yaml lives)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must be a mapping of sections")
    return data


def _check_type(value, tp, where: str):
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _check_type(value, option, where)
            except ParamsError:
                pass
        raise ParamsError(f"{where} = {value!r} has the wrong type; expected {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where} = {value!r} must be a list")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where} = {value!r} must be a mapping")
        return value
    if tp is typing.Any:
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ParamsError(f"{where} = {value!r} has the wrong type; expected {tp.__name__}")
    return value


def parse(cls, data: dict, section: str):
    """Build dataclass `cls` from params section `data`; every key must be known and well typed."""
    if not isinstance(data, dict):
        raise ParamsError(f"params section `{section}` must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean `{section}.{near[0]}`?" if near else f"; known keys: {', '.join(fields)}"
            raise ParamsError(f"unknown param `{section}.{key}` in params.yaml{hint}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _check_type(data[name], hints[name], f"{section}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"params.yaml lacks `{section}.{name}`; add it (see README's params table "
                              f"or profiles/) or restore params.yaml from git")
    return cls(**values)


def load_section(cls, section: str, path: str | Path = "params.yaml"):
    data = read_yaml(path)
    if section not in data:
        raise ParamsError(f"params.yaml has no `{section}` section; restore it from git or a profile")
    return parse(cls, data[section], section)


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_profile(profile: str | Path, params_path: str | Path = "params.yaml") -> dict:
    """Deep-merge a profile file into params.yaml (written in place) and return the result."""
    profile = Path(profile)
    if not profile.exists():
        available = sorted(p.stem for p in Path("profiles").glob("*.yaml"))
        raise ParamsError(f"profile {profile} not found; available: {', '.join(available)}")
    merged = deep_merge(read_yaml(params_path), read_yaml(profile))
    Path(params_path).write_text(yaml.safe_dump(merged, sort_keys=False, default_flow_style=False))
    return merged


# ---- sections -------------------------------------------------------------------------------

@dataclasses.dataclass
class DataParams:
    world: str
    image_size: int
    train_n: int
    test_n: int
    per_shard: int
    seed: int
    test_seed: int


@dataclasses.dataclass
class TrainParams:
    """One fine-tuning/pre-training run; shared by pretrain, backdoor, clean and fare sections."""
    steps: int
    batch_size: int
    lr: float
    warmup: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 0
    seed: int = 0
    shuffle: int = 2000


@dataclasses.dataclass
class PretrainParams(TrainParams):
    model: str = "tiny-rn"
    pretrained: str | None = None


@dataclasses.dataclass
class AttackParams:
    triggers: list[str]
    target: str
    options: dict[str, dict]


@dataclasses.dataclass
class PoisonParams:
    rate: float
    seed: int


@dataclasses.dataclass
class BackdoorParams(TrainParams):
    min_asr: float = 0.9


@dataclasses.dataclass
class EvalParams:
    test_n: int
    retrieval_n: int


@dataclasses.dataclass
class CleanParams(TrainParams):
    data: str = "data/synth"
    methods: list[str] = dataclasses.field(default_factory=lambda: ["finetune", "cleanclip", "par"])


def objective_options(name: str, options: dict) -> dict:
    """Check a method's params section against its objective's constructor (one-line error otherwise)."""
    import inspect

    from .objectives import _registry
    factory = _registry().get(name)
    if factory is None:
        raise ParamsError(f"unknown method {name!r}; valid methods: {', '.join(_registry())}")
    bound = set(getattr(factory, "keywords", None) or {})
    cls = getattr(factory, "func", factory)
    if isinstance(cls, type):
        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self" and p not in bound]
        for key in options:
            if key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=1)
                raise ParamsError(f"unknown param `{name}.{key}`" + (f"; did you mean `{name}.{near[0]}`?" if near
                                  else f"; known: {', '.join(allowed)}"))
    return options
