"""params.yaml: the model of the whole file (the sections of clipshield.sections and nothing else, then the rules
across sections) with every problem named in one line; its sections loaded; profiles (profiles/NAME.yaml, partial
params files) merged into it. Reading the file and wording pydantic's errors: clipshield.paramsfile.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import torch
from pydantic import BaseModel, BeforeValidator, Field, create_model, field_validator, model_validator

from .attacks.triggers import option_problems
from .data.classes import load_classes
from .paramsfile import (ParamsError, ParamsLoader, deep_merge, dump_keeping_comments, load_section,  # noqa: F401
                         merge_profile, parse, read_yaml, refuse, run_name, split_run_name, validated)
from .sections import (FORBID, OPTIONS, SYNTH_DIR, SYNTH_IMAGE_SIZE, AttackParams, BackdoorParams,  # noqa: F401
                       BadclipParams, CleanParams, DataParams, DetectParams, EvalParams, HardenParams, Int,
                       LaunchParams, PoisonParams, PretrainParams, RobustParams, SynthParams, TrainParams)
from .sources import clip_config

SEEDS = "list distinct whole numbers >= 0, e.g. [0] or [0, 1, 2]"


def no_nulls(section):
    """The synth section without its null values: a null means the default."""
    return {k: v for k, v in section.items() if v is not None} if isinstance(section, dict) else section


def _model_side(name: str) -> int | None:
    """The input side of model config `name` (None: local-dir:PATH, whose config is in its folder)."""
    side = None if name.startswith("local-dir:") else clip_config(name)["vision_cfg"]["image_size"]
    return side[0] if isinstance(side, (list, tuple)) else side


def _target_problems(target: str, classes) -> list[str]:
    if target not in classes.names:
        return [f"`attack.target` = {target!r} is not allowed; choose a class of the data set ({classes.source}): "
                f"{classes.listing()}"]
    try:
        classes.index(target)
    except ValueError as e:  # the name of several classes
        return [f"attack.target: {e}"]
    return []


def harden_runs(params: dict) -> dict[str, dict]:
    """Every hardening run of a params file, name -> {method, start, eps?}: harden.runs as written, then for each
    method x start x trigger (attack.triggers) x seed (seeds) of harden.matrix the run
    <method>-<start>-<trigger>-s<seed> from models/<start>-<trigger>-s<seed> (dvc.yaml: harden, harden_matrix).
    A run given twice is refused (ParamsError)."""
    harden = params["harden"]
    matrix, runs = harden.get("matrix") or {}, dict(harden.get("runs") or {})
    for method in matrix.get("methods") or []:
        for start in matrix.get("starts") or []:
            for trigger in params["attack"]["triggers"]:
                for seed in params["seeds"]:
                    model = run_name(start, trigger, seed)
                    name = f"{method}-{model}"
                    if name in runs:
                        raise ParamsError(f"`harden.runs.{name}` is also made by harden.matrix ({method} from "
                                          f"{model}); remove it from harden.runs" if name in (harden.get("runs") or {})
                                          else f"harden.matrix lists {method} or {start} twice; list each once")
                    runs[name] = {"method": method, "start": model}
    return runs


def final_models(params: dict, models: str) -> dict[str, dict]:
    """name -> model-registry entry (dvc.yaml `artifacts:`) for every model the pipeline's stages write under
    these params into folder `models`: the clean model, per trigger and seed the backdoor, every cleaning method's
    model and the filtered re-training (detect.filter_triggers), then the hardening runs."""
    triggers, seeds = params["attack"]["triggers"], params["seeds"]
    out = {"clean": {"path": f"{models}/clean", "type": "model", "desc": "CLIP pre-trained on clean data",
                     "labels": ["attack:none", "defence:none"]}}
    for t in triggers:
        for s in seeds:
            backdoor = run_name("backdoor", t, s)
            out[backdoor] = {
                "path": f"{models}/{backdoor}", "type": "model",
                "desc": f"clean model backdoored with the {t} trigger (target {params['attack']['target']}, seed {s})",
                "labels": ["attack:backdoor", f"trigger:{t}", "defence:none", f"seed:{s}"]}
            for m in params["clean"]["methods"]:
                out[run_name(m, t, s)] = {
                    "path": f"{models}/{run_name(m, t, s)}", "type": "model",
                    "desc": f"{backdoor} cleaned with {m} on synthetic pairs",
                    "labels": ["attack:backdoor", f"trigger:{t}", f"defence:{m}", f"seed:{s}"]}
            if t in params["detect"]["filter_triggers"]:
                filtered = run_name("filtered", t, s)
                out[filtered] = {
                    "path": f"{models}/{filtered}", "type": "model",
                    "desc": f"clean model trained as {backdoor}, on the poisoned set without the pairs detection "
                            f"scored highest",
                    "labels": ["attack:backdoor", f"trigger:{t}", "defence:filter", f"seed:{s}"]}
    for run, spec in harden_runs(params).items():
        start = out.get(spec["start"], {"labels": []})
        trigger = [label for label in start["labels"] if label.startswith(("attack:", "trigger:", "seed:"))]
        before = [label.split(":", 1)[1] for label in start["labels"] if label.startswith("defence:")]
        defence = "+".join([d for d in before if d != "none"] + [spec["method"]])
        eps = spec.get("eps", (params.get(spec["method"]) or {}).get("eps", 4))
        out[run] = {"path": f"{models}/{run}", "type": "model",
                    "desc": f"{spec['start']} adversarially fine-tuned with {spec['method']} (eps {eps:g}/255)",
                    "labels": (trigger or ["attack:none"]) + [f"defence:{defence}"]}
    return out


class _Params(BaseModel):
    """The whole params.yaml: its sections and nothing else, then the rules across sections."""
    model_config = FORBID
    seeds: list[Annotated[Int, Field(ge=0)]] = Field(min_length=1, description=SEEDS)
    train: LaunchParams
    data: DataParams
    eval: EvalParams
    pretrain: PretrainParams
    attack: AttackParams
    poison: PoisonParams
    badclip: BadclipParams
    backdoor: BackdoorParams
    detect: DetectParams
    clean: CleanParams
    harden: HardenParams
    robust: RobustParams
    synth: Annotated[SynthParams, BeforeValidator(no_nulls)]

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds):
        if len(set(seeds)) < len(seeds):
            raise ValueError(SEEDS)
        return seeds

    @field_validator("backdoor", "clean", mode="before")
    @classmethod
    def _seeded_by_seeds(cls, section, info):
        if isinstance(section, dict) and "seed" in section:
            refuse(f"`{info.field_name}.seed` is not used: the top-level `seeds` list sets the training seed of "
                   f"every {info.field_name} run; remove it")
        return section

    @model_validator(mode="after")
    def _across(self):
        t, d, a, bad = self.train, self.data, self.attack, []
        have, kind = (torch.cuda.device_count(), "GPUs") if torch.cuda.is_available() else (os.cpu_count() or 1,
                                                                                               "CPU cores")
        if t.nproc > have:
            bad.append(f"train.nproc = {t.nproc} but this machine has {have} {kind}; set train.nproc <= {have} "
                       f"(e.g. `dvc exp run -S train.nproc={have}`)")
        split, nodes = t.nproc * t.nnodes * t.accum, t.nnodes > 1
        bad += [f"`{name}.batch_size` = {p.batch_size} does not split over train.nproc x {'train.nnodes x ' * nodes}"
                f"train.accum = {t.nproc} x {f'{t.nnodes} x ' * nodes}{t.accum}; use a multiple of {split}"
                for name in ("pretrain", "backdoor", "clean", "harden")
                if t.nproc <= have and (p := getattr(self, name)).batch_size % split]
        side, model = _model_side(self.pretrain.model), self.pretrain.model
        if side not in (None, d.image_size):
            bad.append(f"`data.image_size` = {d.image_size} is not allowed; pretrain.model {model} takes {side} px "
                       f"images: set data.image_size: {side} (or choose a model configured for {d.image_size} px)")
        if d.test_n and self.eval.test_n > d.test_n:  # source shards: data.test_n is a limit (0: every sample)
            bad.append(f"`eval.test_n` = {self.eval.test_n} is not allowed; the test set holds "
                       f"{'' if d.source == 'world' else 'at most '}data.test_n = {d.test_n} samples: set eval.test_n: "
                       f"{d.test_n} (or fewer), or raise data.test_n to {self.eval.test_n}")
        for trigger, options in a.options.items():
            bad += option_problems(trigger, options, d.image_size)
        if self.badclip.patch > d.image_size:
            bad.append(f"`badclip.patch` = {self.badclip.patch} is not allowed; the patch is pasted on data.image_size "
                       f"= {d.image_size} px images: use a side from 1 to {d.image_size}")
        try:
            bad += _target_problems(a.target, load_classes(d.classes))
        except ValueError as e:  # data.classes names no class space
            bad.append(str(e))
        if stray := [t for t in self.detect.filter_triggers if t not in a.triggers]:
            bad.append(f"`detect.filter_triggers` = {stray} is not allowed; only a trigger of attack.triggers has a "
                       f"poisoned set to filter: use some of {a.triggers} (or [])")
        unmade = [s for s in (self.harden.matrix or {}).get("starts") or [] if s not in ("backdoor", *self.clean.methods)]
        if unmade and (self.harden.matrix or {}).get("methods"):
            bad.append(f"`harden.matrix.starts` = {unmade} is not allowed; no stage makes those models: add "
                       f"{', '.join(unmade)} to clean.methods or remove them from harden.matrix.starts")
        try:
            made = set(final_models({**{s: vars(getattr(self, s)) for s in ("harden", "attack", "clean", "detect")},
                                     "seeds": self.seeds}, "models"))
        except ParamsError as e:  # a hardening run given twice
            bad.append(str(e))
        else:
            starts = {name: spec["start"] for name, spec in (self.harden.runs or {}).items()}
            bad += [f"`harden.runs.{name}.start` = {start!r} names no model: no stage makes models/{start} and there "
                    f"is no such folder; start from one of {', '.join(sorted(made - {name}))} (or put a model "
                    f"folder there)" for name, start in starts.items()
                    if start not in made and not (Path("models") / start).is_dir()]
        users = [f"{s}.data" for s in ("clean", "harden") if getattr(self, s).data.rstrip("/") == SYNTH_DIR]
        if users and self.synth.image_size != d.image_size and side in (None, d.image_size):
            bad.append(f"`synth.image_size` = {self.synth.image_size} is not allowed; {' and '.join(users)} train the "
                       f"{d.image_size}-px model (data.image_size) on {SYNTH_DIR}: set synth.image_size: "
                       f"{d.image_size} (generated at synth.height x synth.width, then resized)")
        refuse(*bad)
        return self


Params = create_model("Params", __base__=_Params, **{m: (Optional[model], None) for m, model in OPTIONS.items()})
SECTIONS = [name for name, f in Params.model_fields.items() if f.is_required()]


def validate(raw: dict) -> list[str]:
    """Every problem of a whole params file (empty: valid): every section's at once, then, once the sections are
    well-formed, the rules across them."""
    return validated(Params, raw)[1]


def check_params(path: str | Path = "params.yaml") -> None:
    """Raise one ParamsError listing every problem of the params file (nothing runs before it passes)."""
    problems = validate(read_yaml(path))
    if len(problems) == 1:
        raise ParamsError(problems[0] if problems[0].startswith(str(path)) else f"{path}: {problems[0]}")
    if problems:
        raise ParamsError(f"{path} has {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def load_launch(path: str | Path = "params.yaml") -> LaunchParams:
    data = read_yaml(path).get("train") if Path(path).exists() else None
    return parse(LaunchParams, data, "train") if data is not None else LaunchParams()


def parse_synth(data) -> tuple[SynthParams | None, list[str]]:
    """The synth section checked (a null value means the default), image_size filled in; with every problem found.
    The concept bank is checked where it is read (data.synth.load_bank)."""
    return validated(SynthParams, no_nulls(data), ("synth",))


def objective_options(name: str, options: dict) -> dict:
    """Check a method's params section against its objective's constructor (one-line error otherwise)."""
    if name not in OPTIONS:
        raise ParamsError(f"unknown method {name!r}; valid methods: {', '.join(OPTIONS)}")
    parse(OPTIONS[name], options, name)
    return options


def apply_profile(profile: str | Path, params_path: str | Path = "params.yaml") -> dict:
    """Deep-merge a profile file into params.yaml (written in place) and return the result. Into a whole params file
    the profile may bring no new problem (bar the device count: a profile is written for where it runs); a partial
    one (without every section) is merged as it is, to be checked when it is complete."""
    profile = Path(profile)
    if not profile.exists():
        available = sorted(p.stem for p in Path("profiles").glob("*.yaml"))
        raise ParamsError(f"profile {profile} not found; available: {', '.join(available)}")
    current, override = read_yaml(params_path), read_yaml(profile)
    merged = merge_profile(current, override)
    if all(section in current for section in SECTIONS):
        before = set(validate(current))
        problems = [p for p in validate(merged) if p not in before and not p.startswith("train.nproc = ")]
        if problems:
            raise ParamsError(f"profile {profile} would make {len(problems)} problem(s), so {params_path} was left as "
                              f"it was; fix the profile: " + "; ".join(problems))
    Path(params_path).write_text(dump_keeping_comments(Path(params_path).read_text(), override, merged))
    return merged
