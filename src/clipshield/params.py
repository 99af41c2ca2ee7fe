"""params.yaml: typed sections with one-line errors for missing, unknown or mistyped keys, and profiles.

A profile (profiles/NAME.yaml) is a partial params file; `apply_profile` deep-merges it into params.yaml.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path

import yaml


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
    value, problems = _parse(cls, data, section)
    if problems:
        raise ParamsError("; ".join(problems))
    return value


def _parse(cls, data: dict, section: str):
    """(instance or None, every problem found) for section `data` against dataclass `cls`."""
    if not isinstance(data, dict):
        return None, [f"params section `{section}` must be a mapping, got {data!r}"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    problems = []
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean `{section}.{near[0]}`?" if near else f"; known keys: {', '.join(fields)}"
            problems.append(f"unknown param `{section}.{key}` in params.yaml{hint}")
    values = {}
    for name, f in fields.items():
        if name in data:
            try:
                values[name] = _check_type(data[name], hints[name], f"{section}.{name}")
            except ParamsError as e:
                problems.append(str(e))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"params.yaml lacks `{section}.{name}`; add it (see README's params table "
                            f"or profiles/) or restore params.yaml from git")
    return (None if problems else cls(**values)), problems


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
    override = read_yaml(profile)
    merged = deep_merge(read_yaml(params_path), override)
    if "runs" in (override.get("harden") or {}):  # a profile's harden runs are the whole list, not additions
        merged["harden"]["runs"] = override["harden"]["runs"]
    before = set(validate(read_yaml(params_path)))  # only what the profile brings in (devices: where it runs)
    problems = [p for p in validate(merged) if p not in before and not p.startswith("train.nproc = ")]
    if problems:
        raise ParamsError(f"profile {profile} would make {len(problems)} problem(s), so {params_path} was left as it "
                          f"was; fix the profile: " + "; ".join(problems))
    Path(params_path).write_text(_dump_keeping_comments(Path(params_path).read_text(), override, merged))
    return merged


def _dump_keeping_comments(text: str, override: dict, merged: dict) -> str:
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
    if "runs" in (override.get("harden") or {}):
        doc["harden"]["runs"] = override["harden"]["runs"]
    out = io.StringIO()
    rt.dump(doc, out)
    return out.getvalue()


# ---- sections -------------------------------------------------------------------------------

def warmup_steps(warmup: int | float, steps: int) -> int:
    """Warm-up steps of a run of `steps` steps: a fraction of them when 0 < warmup < 1 (FARE: 0.07 = 7%),
    else `warmup` itself, a whole number of steps (0: none)."""
    return round(warmup * steps) if 0 < warmup < 1 else int(warmup)


@dataclasses.dataclass
class DataParams:
    world: str
    image_size: int
    train_n: int              # source shards: at most this many (0: all)
    test_n: int
    per_shard: int
    seed: int
    test_seed: int
    source: str = "world"     # world: the procedural world | shards: import img2dataset / ImageNet-val shards
    train_shards: str = ""    # source shards: a folder of .tar, a brace pattern or a glob
    test_shards: str = ""     # labelled (KEY.cls or "label" in KEY.json) for zero-shot accuracy and ASR
    classes: str = "world"    # world | imagenet (open_clip's names + OpenAI's 80 templates) | a file of names


@dataclasses.dataclass
class TrainParams:
    """One fine-tuning/pre-training run; shared by pretrain, backdoor, clean and fare sections."""

    def warmup_steps(self) -> int:
        """`warmup` in steps: round(warmup * steps) for a fraction (< 1), the number itself otherwise."""
        return warmup_steps(self.warmup, self.steps)

    steps: int
    batch_size: int
    lr: float
    warmup: int | float = 0           # linear warm-up: a fraction of `steps` when < 1 (0.07: 7%), else whole steps
    schedule: str = "cosine"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 0
    seed: int = 0
    shuffle: int = 2000
    checkpoint_every: int = 100       # steps between resumable checkpoints (0: none)


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
    # A cheaper zero-shot head for quick runs (CPU checks of the paper path; not comparable to the papers' numbers):
    classes: str = "all"      # all: the test set's class space | present: only the classes labelling its scored samples
    templates: int = 0        # prompt templates per class: 0 all (OpenAI's 80 for ImageNet), N the first N


@dataclasses.dataclass
class CleanParams(TrainParams):
    data: str = "data/synth"
    methods: list[str] = dataclasses.field(default_factory=lambda: ["finetune", "cleanclip", "par"])
    allow_poisoned: bool = False      # true: clean on data that holds poisoned samples, on purpose (kept in provenance)


def objective_options(name: str, options: dict) -> dict:
    """Check a method's params section against its objective's constructor (one-line error otherwise)."""
    from .objectives import list_objectives, option_names
    if name not in list_objectives():
        raise ParamsError(f"unknown method {name!r}; valid methods: {', '.join(list_objectives())}")
    allowed = option_names(name)
    for key in options:
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            raise ParamsError(f"unknown param `{name}.{key}`" + (f"; did you mean `{name}.{near[0]}`?" if near
                              else f"; known: {', '.join(allowed)}"))
    return options


@dataclasses.dataclass
class LaunchParams:
    """How training stages run: processes (torchrun), precision and compilation."""
    nproc: int = 1
    precision: str = "auto"   # auto: bf16 on GPU, fp32 on CPU | bf16 | fp32
    compile: str = "auto"     # auto: on for GPU, off for CPU | on | off
    accum: int = 1            # micro-batches per step (gradient accumulation): batch_size / (nproc x accum) at a time
    nnodes: int = 1           # machines per training stage; each runs the stage with nproc processes (torchrun)
    rdzv_endpoint: str = ""   # with nnodes > 1: HOST:PORT where the machines meet (torchrun's c10d rendezvous)
    loader_threads: int | str = "auto"  # image-decoding threads ahead of the model; auto: 0 on CPU, up to 8 on GPU

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def decode_threads(self, on_gpu: bool) -> int:
        """Threads that decode batches ahead of the model: on CPU none (the cores train the model); on a GPU
        as many as this process's share of the CPU cores, at most 8."""
        if self.loader_threads != "auto":
            return int(self.loader_threads)
        return min(8, max(1, (os.cpu_count() or 1) // self.nproc)) if on_gpu else 0


def load_launch(path: str | Path = "params.yaml") -> LaunchParams:
    data = read_yaml(path).get("train") if Path(path).exists() else None
    return parse(LaunchParams, data, "train") if data is not None else LaunchParams()


@dataclasses.dataclass
class HardenParams(TrainParams):
    data: str = "data/train"
    runs: dict[str, dict] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RobustParams:
    eps: list[float]        # in 1/255 units
    n: int
    steps: int
    distortion_n: int = 200
    n_target_classes: int = 9   # APGD-T targets per sample: the most likely wrong classes (AutoAttack: 9)


# ---- the one schema: every section and its constraints, checked before any stage works ---------

def run_name(kind: str, trigger: str, seed: int) -> str:
    """The model of an attack or defence run: <kind>-<trigger>-s<seed> (e.g. par-blended-s0); its folder under
    models/, its metrics file, its DVCLive log and its registry artifact all carry this name."""
    return f"{kind}-{trigger}-s{seed}"


def split_run_name(name: str) -> tuple[str, int | None]:
    """('par-blended', 0) for 'par-blended-s0' (run_name's inverse up to the seed); (name, None) without one."""
    head, _, tail = name.rpartition("-s")
    return (head, int(tail)) if head and tail.isdigit() else (name, None)


@dataclasses.dataclass
class SynthParams:
    """The synthetic cleaning pairs (stage synth -> data/synth): the procedural world's, or Stable Diffusion's."""
    n: int | None = None         # image-text pairs to generate (required)
    generator: str = "procedural"  # procedural | diffusion
    seed: int = 0
    per_shard: int = 1000
    image_size: int | None = None  # saved side in px (None: 32 procedural, 256 diffusion)
    world: str = "rendered"      # procedural: the world that renders the pairs (data.world.WORLDS)
    model: str | None = None     # diffusion: a local diffusers pipeline folder (model_index.json) or a hub id
    height: int = 512            # diffusion: generated at height x width, saved at image_size
    width: int = 512
    steps: int = 50              # denoising steps
    guidance: float = 2.0        # classifier-free guidance scale
    batch_size: int = 8          # images per pipeline call
    scheduler: str = "ddim"      # ddim | pipeline (the model's own)
    concepts: str | None = None  # diffusion: the concept bank YAML (None: the packaged one)


SYNTH_GENERATORS = ("procedural", "diffusion")
SYNTH_SCHEDULERS = ("ddim", "pipeline")
SYNTH_IMAGE_SIZE = {"procedural": 32, "diffusion": 256}


def looks_like_hub_id(model: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model)) and not model.startswith((".", "~"))


def parse_synth(data) -> tuple[SynthParams | None, list[str]]:
    """The synth section parsed and checked like every other (a null value means the default), image_size filled in;
    with every problem found. The concept bank is checked where it is read (data.synth.load_bank)."""
    if not isinstance(data, dict):
        return None, ["params section `synth` must be a mapping with at least `n:` (the pairs to generate)"]
    s, problems = _parse(SynthParams, {k: v for k, v in data.items() if v is not None}, "synth")
    if s is None:
        return None, problems
    from .data.world import WORLDS

    def need(ok: bool, key: str, allowed: str):
        if not ok:
            problems.append(f"`synth.{key}` = {getattr(s, key)!r} is not allowed; {allowed}")

    need(s.generator in SYNTH_GENERATORS, "generator", f"choose {' or '.join(SYNTH_GENERATORS)}")
    need(s.n is not None and s.n >= 1, "n", "set it to the number of image-text pairs to generate (>= 1)")
    need(s.seed >= 0, "seed", "use a whole number >= 0")
    need(s.per_shard >= 1, "per_shard", "set the number of samples per shard (e.g. 1000)")
    need(s.image_size is None or s.image_size >= 8, "image_size",
         "set the saved image side in pixels (e.g. 32 procedural, 256 diffusion)")
    if s.generator == "procedural":
        need(s.world in WORLDS, "world", f"choose one of {sorted(WORLDS)}")
    elif s.generator == "diffusion":
        for key in ("height", "width"):
            side = getattr(s, key)
            need(side >= 8 and side % 8 == 0, key, f"Stable Diffusion needs a multiple of 8, e.g. "
                 f"{max(8, side // 8 * 8)} or {max(8, side // 8 * 8 + 8)} (paper: 512)")
        need(s.steps >= 1, "steps", "set the number of denoising steps >= 1 (paper: 50)")
        need(s.batch_size >= 1, "batch_size", "set the number of images per pipeline call (e.g. 8)")
        need(s.guidance >= 0, "guidance", "use a number >= 0 (paper: 2.0)")
        need(s.scheduler in SYNTH_SCHEDULERS, "scheduler",
             "choose ddim or pipeline ('pipeline' keeps the model's own scheduler)")
        model = s.model.strip() if s.model else ""
        path = Path(model).expanduser()
        need(bool(model), "model", "set it to a local diffusers pipeline folder (with model_index.json) or a hub id "
                                   "such as runwayml/stable-diffusion-v1-5")
        if model and path.is_dir():
            need((path / "model_index.json").is_file(), "model", "it is a folder without model_index.json; point it "
                 "at a diffusers pipeline folder (written by save_pretrained)")
        elif model:
            need(looks_like_hub_id(model), "model", f"model folder {path} does not exist; create it "
                 f"(pipeline.save_pretrained) or set synth.model to an existing folder or hub id")
    if problems:
        return None, problems
    return dataclasses.replace(s, image_size=s.image_size or SYNTH_IMAGE_SIZE[s.generator],
                               guidance=float(s.guidance)), []


SECTIONS = {"train": LaunchParams, "data": DataParams, "eval": EvalParams, "pretrain": PretrainParams,
            "attack": AttackParams, "poison": PoisonParams, "backdoor": BackdoorParams, "clean": CleanParams,
            "harden": HardenParams, "robust": RobustParams}


ROBUST_METHODS = ("fare", "tecoa")


def _constraints(v: dict) -> list[str]:
    """Range and name checks on parsed sections `v` (only those that parsed)."""
    from .attacks.triggers import TRIGGERS, option_problems
    from .data.classes import load_classes
    from .data.world import WORLDS
    from .training import SCHEDULES
    out = []

    def need(ok: bool, key: str, value, allowed: str):
        if not ok:
            out.append(f"`{key}` = {value!r} is not allowed; {allowed}")

    for name, p in v.items():
        if isinstance(p, TrainParams):
            evaluate_only = name == "pretrain" and p.pretrained is not None and p.steps == 0
            need(p.steps >= 1 or evaluate_only, f"{name}.steps", p.steps, "use a whole number >= 1"
                 + (" (0 only with pretrained weights: evaluate them as they are)" if name == "pretrain" else ""))
            need(p.batch_size >= 1, f"{name}.batch_size", p.batch_size, "use a whole number >= 1")
            need(p.lr > 0, f"{name}.lr", p.lr, "use a learning rate > 0")
            need(p.warmup >= 0 and (p.warmup < 1 or float(p.warmup).is_integer()), f"{name}.warmup", p.warmup,
                 "use a fraction of the steps in [0, 1) (0.07: 7%) or a whole number of steps >= 1")
            need(p.schedule in SCHEDULES, f"{name}.schedule", p.schedule,
                 f"choose {', '.join(SCHEDULES[:-1])} or {SCHEDULES[-1]}")
            need(p.weight_decay >= 0, f"{name}.weight_decay", p.weight_decay, "use a number >= 0")
            need(p.grad_clip >= 0, f"{name}.grad_clip", p.grad_clip, "use a number >= 0 (0: no clipping)")
            need(p.shuffle >= 0, f"{name}.shuffle", p.shuffle, "use a buffer size >= 0")
            need(p.checkpoint_every >= 0, f"{name}.checkpoint_every", p.checkpoint_every, "use 0 (none) or more steps")
    if "train" in v:
        t = v["train"]
        need(t.nproc >= 1, "train.nproc", t.nproc, "use a whole number >= 1 (processes per training stage)")
        need(t.precision in ("auto", "bf16", "fp32"), "train.precision", t.precision, "choose auto, bf16 or fp32")
        need(t.compile in ("auto", "on", "off"), "train.compile", t.compile, "choose auto, on or off")
        need(t.accum >= 1, "train.accum", t.accum, "use a whole number >= 1 (micro-batches per step)")
        need(t.nnodes >= 1, "train.nnodes", t.nnodes, "use a whole number >= 1 (machines per training stage)")
        need(t.loader_threads == "auto" or (isinstance(t.loader_threads, int) and t.loader_threads >= 0),
             "train.loader_threads", t.loader_threads, "use auto or a whole number >= 0 (0: decode in the training thread)")
        if t.nnodes > 1:
            host, _, port = t.rdzv_endpoint.rpartition(":")
            need(bool(host) and port.isdigit() and 0 < int(port) < 65536, "train.rdzv_endpoint", t.rdzv_endpoint,
                 f"with train.nnodes = {t.nnodes} give HOST:PORT of the first machine, reachable from every other "
                 f"(e.g. 10.0.0.1:29400)")
        from .distributed import available_devices
        have, kind = available_devices()
        if t.nproc > have:
            out.append(f"train.nproc = {t.nproc} but this machine has {have} {kind}; set train.nproc <= {have} "
                       f"(e.g. `dvc exp run -S train.nproc={have}`)")
        for name, p in v.items():
            split = t.nproc * t.nnodes * t.accum
            if isinstance(p, TrainParams) and 1 <= t.nproc <= have and t.accum >= 1 and t.nnodes >= 1 \
                    and p.batch_size % split:
                over = "train.nproc x train.accum" if t.nnodes == 1 else "train.nproc x train.nnodes x train.accum"
                sizes = f"{t.nproc} x {t.accum}" if t.nnodes == 1 else f"{t.nproc} x {t.nnodes} x {t.accum}"
                out.append(f"`{name}.batch_size` = {p.batch_size} does not split over {over} = "
                           f"{sizes}; use a multiple of {split}")
    classes = None
    if "data" in v:
        d = v["data"]
        need(d.world in WORLDS, "data.world", d.world, f"choose one of {sorted(WORLDS)}")
        need(d.source in ("world", "shards"), "data.source", d.source,
             "choose world (the procedural world) or shards (import img2dataset / ImageNet-val shards)")
        for k in ("image_size", "per_shard") + (("train_n", "test_n") if d.source == "world" else ()):
            need(getattr(d, k) >= 1, f"data.{k}", getattr(d, k), "use a whole number >= 1")
        for k in ("train_n", "test_n") if d.source == "shards" else ():
            need(getattr(d, k) >= 0, f"data.{k}", getattr(d, k), "use 0 (every sample) or a limit >= 1")
        if d.source == "world":
            need(d.classes == "world", "data.classes", d.classes, "the procedural world's classes are `world`")
        for k in ("train_shards", "test_shards") if d.source == "shards" else ():
            need(bool(getattr(d, k)), f"data.{k}", getattr(d, k), "give the source shards: a folder of .tar "
                 "files, a brace pattern (/data/cc3m/{00000..00331}.tar) or a glob")
        try:
            classes = load_classes(d.classes)
        except ValueError as e:
            out.append(str(e))
    if "eval" in v:
        for k in ("test_n", "retrieval_n"):
            need(getattr(v["eval"], k) >= 1, f"eval.{k}", getattr(v["eval"], k), "use a whole number >= 1")
        need(v["eval"].classes in ("all", "present"), "eval.classes", v["eval"].classes,
             "choose all (the test set's class space) or present (only the classes labelling the scored samples)")
        need(v["eval"].templates >= 0, "eval.templates", v["eval"].templates,
             "use 0 (every template of the class space) or the number of templates to keep")
    if "pretrain" in v:
        import open_clip

        from . import models  # noqa: F401  (registers clipshield's configs)
        m = v["pretrain"].model
        need(m.startswith("local-dir:") or open_clip.get_model_config(m) is not None, "pretrain.model", m,
             f"use a config from src/clipshield/configs ({', '.join(sorted(models.register_configs()))}), "
             f"an open_clip name such as ViT-B-32, or local-dir:PATH")
        cfg = None if m.startswith("local-dir:") else open_clip.get_model_config(m)
        if cfg is not None and "data" in v:
            side = cfg["vision_cfg"]["image_size"]
            side = side if isinstance(side, int) else side[0]
            need(side == v["data"].image_size, "data.image_size", v["data"].image_size,
                 f"pretrain.model {m} takes {side} px images: set data.image_size: {side} (or choose a model "
                 f"configured for {v['data'].image_size} px)")
    if "attack" in v:
        a = v["attack"]
        for t in a.triggers:
            need(t in TRIGGERS, "attack.triggers", t, f"valid triggers: {', '.join(TRIGGERS)}")
        for t, opts in a.options.items():
            need(t in TRIGGERS, "attack.options", t, f"options are keyed by trigger: {', '.join(TRIGGERS)}")
            if t in TRIGGERS:
                out += option_problems(t, opts, v["data"].image_size if "data" in v else None)
        if classes is not None and a.target in classes.names:
            try:
                classes.index(a.target)
            except ValueError as e:
                out.append(f"attack.target: {e}")
        elif classes is not None:
            need(False, "attack.target", a.target, f"choose a class of the data set ({classes.source}): {classes.listing()}")
    if "poison" in v:
        need(0 <= v["poison"].rate <= 1, "poison.rate", v["poison"].rate, "use a fraction in [0, 1]")
    if "backdoor" in v:
        need(0 <= v["backdoor"].min_asr <= 1, "backdoor.min_asr", v["backdoor"].min_asr, "use a fraction in [0, 1]")
    if "clean" in v:
        from .objectives import methods
        cleaners = methods("clean")
        for m in v["clean"].methods:
            need(m in cleaners, "clean.methods", m, f"valid cleaning methods: {', '.join(cleaners)}")
    if "harden" in v:
        for run, spec in v["harden"].runs.items():
            if not isinstance(spec, dict):
                out.append(f"`harden.runs.{run}` = {spec!r} must be a mapping like {{method: fare, start: clean}}")
                continue
            need(spec.get("method") in ROBUST_METHODS, f"harden.runs.{run}.method", spec.get("method"),
                 f"choose one of {', '.join(ROBUST_METHODS)}")
            need(isinstance(spec.get("start"), str), f"harden.runs.{run}.start", spec.get("start"),
                 "name a model folder under models/ (e.g. clean, par-blended-s0)")
            eps = spec.get("eps", 0)
            need(isinstance(eps, (int, float)) and 0 <= eps <= 255, f"harden.runs.{run}.eps", eps,
                 "it is in 1/255 units: use a number in [0, 255]")
            for key in set(spec) - {"method", "start", "eps"}:
                out.append(f"unknown key `harden.runs.{run}.{key}`; a run has method, start and optionally eps")
    if "robust" in v:
        for e in v["robust"].eps:
            need(0 <= e <= 255, "robust.eps", e, "eps is in 1/255 units: use numbers in [0, 255]")
        need(v["robust"].n >= 1, "robust.n", v["robust"].n, "use a whole number >= 1")
        need(v["robust"].steps >= 1, "robust.steps", v["robust"].steps, "use a whole number >= 1")
        need(v["robust"].n_target_classes >= 1, "robust.n_target_classes", v["robust"].n_target_classes,
             "use a whole number >= 1 (APGD-T's targets per sample; AutoAttack: 9)")
    return out


def _method_problems(raw: dict) -> list[str]:
    """The objectives' sections (par, finetune, cleanclip, fare, tecoa): known keys, sane values."""
    from .objectives import list_objectives
    out = []
    for name in list_objectives():
        options = raw.get(name)
        if options is None:
            continue
        if not isinstance(options, dict):
            out.append(f"params section `{name}` must be a mapping, got {options!r}")
            continue
        try:
            objective_options(name, options)
        except ParamsError as e:
            out.append(str(e))
        for key, value in options.items():
            where = f"{name}.{key}"
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                out.append(f"`{where}` = {value!r} must be a number")
            elif name in ROBUST_METHODS and key in ("eps", "step_size") and not (
                    0 <= value <= 255 if key == "eps" else 0 < value <= 255):
                out.append(f"`{where}` = {value!r} is not allowed; it is in 1/255 units: use a number in "
                           + ("[0, 255]" if key == "eps" else "(0, 255]"))
            elif key == "eps" and value < 0:
                out.append(f"`{where}` = {value!r} is not allowed; use a number >= 0")
            elif key.endswith("_p") and not 0 <= value <= 1:
                out.append(f"`{where}` = {value!r} is not allowed; a probability is in [0, 1]")
            elif key in ("steps",) and (value < 1 or not isinstance(value, int)):
                out.append(f"`{where}` = {value!r} is not allowed; use a whole number >= 1")
            elif key in ("noise_std", "weight") and value < 0:
                out.append(f"`{where}` = {value!r} is not allowed; use a number >= 0")
    return out


SYNTH_DIR = "data/synth"


def _model_side(parsed: dict) -> int | None:
    """The input side of pretrain.model's config (None: a local-dir model or no pretrain section)."""
    import open_clip

    from . import models  # noqa: F401  (registers clipshield's configs)
    m = parsed["pretrain"].model if "pretrain" in parsed else "local-dir:"
    cfg = None if m.startswith("local-dir:") else open_clip.get_model_config(m)
    side = cfg["vision_cfg"]["image_size"] if cfg else None
    return side[0] if isinstance(side, (list, tuple)) else side


def _synth_size_problems(synth: SynthParams, parsed: dict) -> list[str]:
    """The synthetic pairs train the model (clean.data or harden.data at data/synth): they must be at its input size,
    which training checks only when the cleaning stage starts (hours into a paper run)."""
    users = [f"{s}.data" for s in ("clean", "harden") if s in parsed and parsed[s].data.rstrip("/") == SYNTH_DIR]
    size = parsed["data"].image_size if "data" in parsed else None
    if not users or size is None or synth.image_size == size or _model_side(parsed) not in (None, size):
        return []  # (a data.image_size the model does not take is a problem of its own)
    return [f"`synth.image_size` = {synth.image_size} is not allowed; {' and '.join(users)} train the {size}-px model "
            f"(data.image_size) on {SYNTH_DIR}: set synth.image_size: {size} (generated at synth.height x synth.width, "
            f"then resized)"]


def validate(raw: dict) -> list[str]:
    """Every problem of a whole params file at once (empty: valid)."""
    problems, parsed = [], {}
    seeds = raw.get("seeds")
    if not (isinstance(seeds, list) and seeds and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                      for x in seeds) and len(set(seeds)) == len(seeds)):
        problems.append(f"`seeds` = {seeds!r} is not allowed; list distinct whole numbers >= 0, e.g. [0] or [0, 1, 2]")
    for section in ("backdoor", "clean"):
        if isinstance(raw.get(section), dict) and "seed" in raw[section]:
            problems.append(f"`{section}.seed` is not used: the top-level `seeds` list sets the training seed of "
                            f"every {section} run; remove it")
    for section, cls in SECTIONS.items():
        if section not in raw:
            problems.append(f"params.yaml has no `{section}` section; restore it from git or a profile")
            continue
        value, found = _parse(cls, raw[section], section)
        problems += found
        if value is not None:
            parsed[section] = value
    problems += _constraints(parsed) + _method_problems(raw)
    if "synth" in raw:
        synth, found = parse_synth(raw["synth"])
        problems += found
        if synth is not None:
            problems += _synth_size_problems(synth, parsed)
    else:
        problems.append("params.yaml has no `synth` section; restore it from git or a profile")
    return problems


def check_params(path: str | Path = "params.yaml") -> None:
    """Raise one ParamsError listing every problem of the params file (nothing runs before it passes)."""
    problems = validate(read_yaml(path))
    if len(problems) == 1:
        raise ParamsError(problems[0] if problems[0].startswith(str(path)) else f"{path}: {problems[0]}")
    if problems:
        raise ParamsError(f"{path} has {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
