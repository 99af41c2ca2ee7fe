"""params.yaml as a file: read as DVC reads it, its schema's errors as one line each (the key, the value, what is
allowed), profiles merged into it with its comments kept, and the run names its sections make. The schema itself:
clipshield.sections (each section) and clipshield.params (the whole file)."""
from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Union

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError


class ParamsError(ValueError):
    pass


class ParamsLoader(yaml.SafeLoader):
    """Reads params files as DVC does (YAML 1.2: `1e-4` is a float) and refuses a key given twice (DVC calls
    such a file corrupted, PyYAML would keep the last value)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ParamsError(f"{key_node.start_mark.name} line {line}: key `{key}` is given twice (first on line "
                                  f"{seen[key]}); DVC calls such a file corrupted: keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep)


ParamsLoader.add_implicit_resolver(  # YAML 1.2 floats without a dot: 1e-4, -2E+3
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found; run from the project root (where params.yaml lives)")
    try:
        loader = ParamsLoader(path.read_text())
        loader.name = str(path)
        try:
            data = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must be a mapping of sections")
    return data


def refuse(*problems) -> None:
    """Raise what a schema validator found, each (key under its model, value, what is allowed) or a whole message."""
    if problems:
        raise PydanticCustomError("params", "{problems}", {"problems": list(problems)})


TYPE_NAMES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool"}


def _bare(tp):
    """`tp` without Annotated[...] and Optional[...]."""
    while True:
        args, origin = typing.get_args(tp), typing.get_origin(tp)
        if origin is Annotated:
            tp = args[0]
        elif origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
            tp = args[0] if args[1] is type(None) else args[1]
        else:
            return tp


def _fields(tp) -> dict | None:
    """The fields of a pydantic model or dataclass (None: `tp` is neither)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp.model_fields
    return getattr(tp, "__pydantic_fields__", None)


def _walk(model, loc):
    """Where pydantic's error location `loc` points from `model`: its keys (less the tags of union members), the
    fields of the innermost model, the last field named and the type there."""
    tp, keys, fields, info = model, [], {}, None
    for part in loc:
        tp = _bare(tp)
        if _fields(tp) is not None:
            fields = _fields(tp)
            info, tp = (fields[part], fields[part].annotation) if part in fields else (info, tp)
        elif typing.get_origin(tp) in (Union, types.UnionType):
            continue  # the tag of the union member that failed: no key
        elif typing.get_origin(tp) in (dict, list):
            tp = typing.get_args(tp)[-1]
        keys.append(part)
    return tuple(keys), fields, info, _bare(tp)


def _message(err: dict, keys: tuple, fields: dict, info, tp, expected: str) -> list[str]:
    kind, value, ctx = err["type"], err["input"], err.get("ctx", {})
    key = ".".join(str(k) for k in keys if not isinstance(k, int))
    where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")
    if kind == "must":  # a validator's own words after the value
        return [f"`{key}` = {value!r} {err['msg']}"]
    if kind == "params":
        return [p if isinstance(p, str) else f"`{key + '.' if key else ''}{p[0]}` = {p[1]!r} is not allowed; {p[2]}"
                for p in ctx["problems"]]
    if kind == "missing":
        return [f"params.yaml has no `{key}` section; restore it from git or a profile" if len(keys) == 1 else
                f"params.yaml lacks `{key}`; add it (see docs/decisions.md or profiles/) or restore params.yaml "
                f"from git"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        what, parent = ("section", "") if len(keys) == 1 else ("param", key.rpartition(".")[0] + ".")
        near = difflib.get_close_matches(str(keys[-1]), fields, n=1)
        return [f"unknown {what} `{key}` in params.yaml; " + (f"did you mean `{parent}{near[0]}`?" if near else
                f"known {'sections' if len(keys) == 1 else 'keys'}: {', '.join(fields)}")]
    if kind in ("dict_type", "dataclass_type", "model_type", "model_attributes_type"):
        return [f"params section `{key}` must be a mapping, got {value!r}" if len(keys) == 1 else
                f"{where} = {value!r} must be a mapping"]
    if kind in ("list_type", *TYPE_NAMES):
        return [f"{where} = {value!r} " + ("must be a list" if kind == "list_type" else
                                          f"has the wrong type; expected {expected}")]
    value = float(value) if tp is float and type(value) is int else value  # as read: a float given as 3 is 3.0
    allowed = (str(ctx["error"]) if kind == "value_error" else info.description if info and info.description else
               "choose " + ctx["expected"].replace("'", "") if kind == "literal_error" else err["msg"])
    return [f"`{key}` = {value!r} is not allowed; {allowed}"]


def validated(model, data, prefix: tuple = ()):
    """(`data` validated by pydantic `model`, or None; every problem found, one line each), keys under `prefix`."""
    try:
        return model.__pydantic_validator__.validate_python(data), []
    except ValidationError as e:
        at = {}
        for err in e.errors():  # grouped by key: the members of a union fail together
            keys, *where = _walk(model, err["loc"])
            at.setdefault(keys, []).append((err, *where))
        out = []
        for keys, errs in at.items():
            wrong = [TYPE_NAMES[err["type"]] for err, *_ in errs if err["type"] in TYPE_NAMES]
            if len(wrong) < len(errs):  # a union: the member the value was meant for says what is wrong
                errs = [x for x in errs if x[0]["type"] not in TYPE_NAMES]
            for err, fields, info, tp in errs:
                out += _message(err, prefix + keys, fields, info, tp, " | ".join(wrong))
        return None, list(dict.fromkeys(out))


def parse(cls, data, section: str):
    """Section `data` as model `cls` (clipshield.params); every key must be known, well typed and in range."""
    value, problems = validated(cls, data, (section,))
    if problems:
        raise ParamsError("; ".join(problems))
    return value


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


WHOLE_KEYS = ("runs", "matrix")  # of harden: a profile gives them whole, never key by key


def merge_profile(params: dict, override: dict) -> dict:
    """`params` with profile `override` deep-merged in; a profile's harden runs and harden matrix are whole, not
    additions."""
    merged = deep_merge(params, override)
    for key in [k for k in WHOLE_KEYS if k in (override.get("harden") or {})]:
        merged["harden"][key] = override["harden"][key]
    return merged


def dump_keeping_comments(text: str, override: dict, merged: dict) -> str:
    """params.yaml text with `override` merged in, comments and key order kept (ruamel.yaml round trip;
    without ruamel the merged file is written plain)."""
    try:
        from ruamel.yaml import YAML
    except ImportError:
        return yaml.safe_dump(merged, sort_keys=False, default_flow_style=False)
    import io
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a long line of params.yaml
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(text)

    def merge(node, new):
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(node.get(k), dict):
                merge(node[k], v)
            else:
                node[k] = v
    merge(doc, override)
    for key in [k for k in WHOLE_KEYS if k in (override.get("harden") or {})]:
        doc["harden"][key] = override["harden"][key]
    out = io.StringIO()
    rt.dump(doc, out)
    return out.getvalue()


def run_name(kind: str, trigger: str, seed: int) -> str:
    """The model of an attack or defence run: <kind>-<trigger>-s<seed> (e.g. par-blended-s0); its folder under
    models/, its metrics file, its DVCLive log and its registry artifact all carry this name."""
    return f"{kind}-{trigger}-s{seed}"


def split_run_name(name: str) -> tuple[str, int | None]:
    """('par-blended', 0) for 'par-blended-s0' (run_name's inverse up to the seed); (name, None) without one."""
    head, _, tail = name.rpartition("-s")
    return (head, int(tail)) if head and tail.isdigit() else (name, None)
