"""params.yaml's sections, a pydantic model each: no unknown key, types, ranges (the whole file: clipshield.params).
Each check names what is allowed (a field's description, its choices, or refuse(key, value, allowed)), which
paramsfile words as one line. The methods' sections take what their objectives take (objectives.option_names)."""
from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, create_model,
                      field_validator, model_validator)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from .attacks.triggers import TRIGGERS
from .data.world import WORLDS
from .detection import SCORES
from .objectives import list_objectives, methods, option_names
from .paramsfile import refuse
from .schedules import SCHEDULES
from .sources import CONFIG_DIR, clip_config, diffusion_model_problem

FORBID = ConfigDict(extra="forbid")  # at every level: an unknown key is refused, never ignored
Int, Float = Annotated[int, Strict()], Annotated[float, Strict()]  # 2.5, "3" and true are no int; 3 is a float (3.0)
Str, Bool = Annotated[str, Strict()], Annotated[bool, Strict()]
Number = Union[Int, Float]  # kept as written: 100 stays an int, 0.07 a float
WHOLE, UNITS, NUMBER = "use a whole number >= 1", "it is in 1/255 units: use a number in", "use a number >= 0"
Whole = Annotated[Int, Field(ge=1, description=WHOLE)]
Limit = Annotated[Int, Field(ge=0, description="use 0 (every sample) or a limit >= 1")]
Fraction = Annotated[Float, Field(ge=0, le=1, description="use a fraction in [0, 1]")]
World = Annotated[Literal[tuple(WORLDS)], Field(description=f"choose one of {sorted(WORLDS)}")]
SYNTH_DIR, SYNTH_IMAGE_SIZE = "data/synth", {"procedural": 32, "diffusion": 256}
PRETRAIN_STEPS = WHOLE + " (0 only with pretrained weights: evaluate them as they are)"
AS_WRITTEN = AfterValidator(lambda m: m.model_dump(exclude_unset=True))  # a model's keys as written, a dict


def _one_of(names, what: str) -> AfterValidator:
    """A name of registry `names()`, read when checked (a registry can grow)."""
    def check(name: str) -> str:
        if name not in names():
            raise ValueError(f"valid {what}: {', '.join(names())}")
        return name
    return AfterValidator(check)


@dataclass(config=FORBID)
class DataParams:
    world: World
    image_size: Whole
    train_n: Limit            # source shards: at most this many (0: all)
    test_n: Limit
    per_shard: Whole
    seed: Int
    test_seed: Int
    source: Literal["world", "shards"] = Field("world", description="choose world (the procedural world) or shards "
                                               "(import img2dataset / ImageNet-val shards)")
    train_shards: Str = ""    # source shards: a folder of .tar, a brace pattern or a glob
    test_shards: Str = ""     # labelled (KEY.cls or "label" in KEY.json) for zero-shot accuracy and ASR
    classes: Str = "world"    # world | imagenet (open_clip's names + OpenAI's 80 templates) | a file of names

    @model_validator(mode="after")
    def _by_source(self):
        if self.source == "shards":
            bad = [(k, getattr(self, k), "give the source shards: a folder of .tar files, a brace pattern "
                    "(/data/cc3m/{00000..00331}.tar) or a glob") for k in ("train_shards", "test_shards")
                   if not getattr(self, k)]
        else:
            bad = [(k, getattr(self, k), WHOLE) for k in ("train_n", "test_n") if getattr(self, k) < 1]
            bad += [("classes", self.classes, "the procedural world's classes are `world`")] * (self.classes != "world")
        refuse(*bad)
        return self


@dataclass(config=FORBID)
class TrainParams:
    """One fine-tuning/pre-training run; shared by pretrain, backdoor, clean and harden sections."""
    steps: Whole
    batch_size: Whole
    lr: Annotated[Float, Field(gt=0, description="use a learning rate > 0")]
    warmup: Number = 0                # linear warm-up: a fraction of `steps` when < 1 (0.07: 7%), else whole steps
    schedule: Literal[SCHEDULES] = "cosine"
    weight_decay: Float = Field(0.1, ge=0, description=NUMBER)
    grad_clip: Float = Field(1.0, ge=0, description=NUMBER + " (0: no clipping)")
    eval_every: Int = 0
    seed: Int = 0
    shuffle: Int = Field(2000, ge=0, description="use a buffer size >= 0")
    checkpoint_every: Int = Field(100, ge=0, description="use 0 (none) or more steps")  # between resumable checkpoints

    @field_validator("warmup")
    @classmethod
    def _warmup(cls, w):
        if w < 0 or (w >= 1 and not float(w).is_integer()):
            raise ValueError("use a fraction of the steps in [0, 1) (0.07: 7%) or a whole number of steps >= 1")
        return w


@dataclass(config=FORBID)
class PretrainParams(TrainParams):
    steps: Annotated[Int, Field(ge=0, description=PRETRAIN_STEPS)]
    model: Str = "tiny-rn"
    pretrained: Optional[Str] = None

    @field_validator("model")
    @classmethod
    def _known(cls, m):
        if not m.startswith("local-dir:") and clip_config(m) is None:
            names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
            raise ValueError(f"use a config from src/clipshield/configs ({names}), an open_clip name such as ViT-B-32, "
                             f"or local-dir:PATH")
        return m

    @model_validator(mode="after")
    def _evaluate_only(self):
        if self.steps == 0 and self.pretrained is None:
            refuse(("steps", 0, PRETRAIN_STEPS))
        return self


@dataclass(config=FORBID)
class AttackParams:
    triggers: list[Annotated[Str, _one_of(lambda: TRIGGERS, "triggers")]]
    target: Str
    options: dict[Str, Any]   # per trigger: checked by its trigger at data.image_size (the rules across sections)

    @model_validator(mode="after")
    def _keyed_by_trigger(self):
        refuse(*[("options", t, f"options are keyed by trigger: {', '.join(TRIGGERS)}") for t in self.options
                 if t not in TRIGGERS])
        return self


@dataclass(config=FORBID)
class PoisonParams:
    rate: Fraction
    seed: Int


@dataclass(config=FORBID)
class BadclipParams:
    """The BadCLIP patch optimisation (stage badclip; docs/methods.md §2): Adam on a patch pasted in the middle."""
    patch: Whole              # side in pixels (the reference: 16 at 224)
    steps: Whole
    batch_size: Whole
    lr: Annotated[Float, Field(gt=0, description="use a learning rate > 0")]
    images: Whole             # non-target training images the patch is pasted on
    positives: Whole          # target training images (and their captions) it is pulled towards
    aug_p: Fraction = 0.5     # share of batches AutoAugmented
    weight: Float = Field(500.0, ge=0, description=NUMBER)  # of the image (triplet) term against the text term
    margin: Float = Field(1.0, ge=0, description=NUMBER)    # of the triplet term
    seed: Int = 0


@dataclass(config=FORBID)
class BackdoorParams(TrainParams):
    min_asr: Fraction = 0.9


@dataclass(config=FORBID)
class DetectParams:
    """Backdoor-sample detection in the poisoned training set (stage detect) and the filtered re-training."""
    k: Int = Field(16, ge=2, description="use a whole number >= 2 (the neighbours of each pair; the reference: 16)")
    batch_size: Limit = 512   # neighbours drawn from random batches of this many pairs (0: the whole set)
    seed: Int = 0             # the random batches
    score: Annotated[Str, _one_of(lambda: SCORES, "scores")] = "k_distance"  # the score the filtering drops pairs by
    filter_fraction: Fraction = 0.02  # share of the pairs with the highest `score` dropped before re-training
    filter_triggers: list[Annotated[Str, _one_of(lambda: TRIGGERS, "triggers")]] = dataclasses.field(
        default_factory=list)  # the triggers whose poisoned sets are filtered and trained on again (stage filtered)


@dataclass(config=FORBID)
class EvalParams:
    test_n: Whole
    retrieval_n: Whole
    # A cheaper zero-shot head for quick runs (CPU checks of the paper path; not comparable to the papers' numbers):
    classes: Literal["all", "present"] = Field("all", description="choose all (the test set's class space) or present "
                                               "(only the classes labelling the scored samples)")
    templates: Int = Field(0, ge=0, description="use 0 (every template of the class space) or the number of "
                                                "templates to keep")  # prompt templates per class: the first N


@dataclass(config=FORBID)
class CleanParams(TrainParams):
    data: Str = SYNTH_DIR
    methods: list[Annotated[Str, _one_of(lambda: methods("clean"), "cleaning methods")]] = dataclasses.field(
        default_factory=lambda: ["finetune", "cleanclip", "par"])
    allow_poisoned: Bool = False      # true: clean on data that holds poisoned samples, on purpose (kept in provenance)


@dataclass(config=FORBID)
class LaunchParams:
    """How training stages run: processes (torchrun), precision and compilation."""
    nproc: Int = Field(1, ge=1, description=WHOLE + " (processes per training stage)")
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: Literal["auto", "on", "off"] = "auto"       # auto: on for GPU, off for CPU
    accum: Int = Field(1, ge=1, description=WHOLE + " (micro-batches per step)")  # batch_size / (nproc x accum) at once
    nnodes: Int = Field(1, ge=1, description=WHOLE + " (machines per training stage)")  # each runs nproc processes
    rdzv_endpoint: Str = ""   # with nnodes > 1: HOST:PORT where the machines meet (torchrun's c10d rendezvous)
    loader_threads: Union[Annotated[Int, Field(ge=0)], Literal["auto"]] = Field(  # auto: 0 on CPU, up to 8 on GPU
        "auto", description="use auto or a whole number >= 0 (0: decode in the training thread)")

    @model_validator(mode="after")
    def _endpoint(self):
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if self.nnodes > 1 and not (host and port.isdigit() and 0 < int(port) < 65536):
            refuse(("rdzv_endpoint", self.rdzv_endpoint, f"with train.nnodes = {self.nnodes} give HOST:PORT of the "
                    f"first machine, reachable from every other (e.g. 10.0.0.1:29400)"))
        return self



class HardenRun(BaseModel):
    """One of harden.runs: its method, the model folder under models/ it starts from, optionally its own eps."""
    model_config = FORBID
    method: Literal[tuple(methods("harden"))]
    start: Str
    eps: Number = Field(0, ge=0, le=255, description=f"{UNITS} [0, 255]")


class HardenMatrix(BaseModel):  # a run per method x start x trigger x seed: params.harden_runs
    model_config = FORBID
    methods: list[Annotated[Str, _one_of(lambda: methods("harden"), "harden methods")]] = []
    starts: list[Annotated[Str, _one_of(lambda: [*methods("clean"), "backdoor"], "starts")]] = []


@dataclass(config=FORBID)
class HardenParams(TrainParams):
    data: Str = "data/train"
    runs: dict[Str, Annotated[HardenRun, AS_WRITTEN]] = dataclasses.field(default_factory=dict)  # {method, start, eps?}
    matrix: Annotated[HardenMatrix, AS_WRITTEN] = dataclasses.field(default_factory=dict)  # {methods?, starts?}


@dataclass(config=FORBID)
class RobustParams:
    eps: Annotated[list[Annotated[Float, Field(ge=0, le=255)]],
                   Field(description="eps is in 1/255 units: use numbers in [0, 255]")]
    n: Whole
    steps: Whole
    distortion_n: Int = 200
    n_target_classes: Int = Field(9, ge=1, description=WHOLE + " (APGD-T's targets per sample; AutoAttack: 9)")


@dataclass(config=FORBID)
class SynthParams:
    """The synthetic cleaning pairs (stage synth -> data/synth): the procedural world's, or Stable Diffusion's."""
    n: Optional[Annotated[Int, Field(ge=1)]] = Field(None, description="set it to the number of image-text pairs to "
                                                                       "generate (>= 1)")
    generator: Literal["procedural", "diffusion"] = "procedural"
    seed: Int = Field(0, ge=0, description="use a whole number >= 0")
    per_shard: Int = Field(1000, ge=1, description="set the number of samples per shard (e.g. 1000)")
    image_size: Optional[Annotated[Int, Field(ge=8)]] = Field(None, description="set the saved image side in pixels "
                                                              "(e.g. 32 procedural, 256 diffusion)")
    world: World = "rendered"    # procedural: the world that renders the pairs
    model: Optional[Str] = None  # diffusion: a local diffusers pipeline folder (model_index.json) or a hub id
    height: Int = 512            # diffusion: generated at height x width, saved at image_size
    width: Int = 512
    steps: Int = Field(50, ge=1, description="set the number of denoising steps >= 1 (paper: 50)")
    guidance: Float = Field(2.0, ge=0, description=NUMBER + " (paper: 2.0)")  # classifier-free guidance scale
    batch_size: Int = Field(8, ge=1, description="set the number of images per pipeline call (e.g. 8)")
    scheduler: Literal["ddim", "pipeline"] = Field("ddim", description="choose ddim or pipeline ('pipeline' keeps the "
                                                   "model's own scheduler)")
    concepts: Optional[Str] = None  # diffusion: the concept bank YAML (None: the packaged one)

    @model_validator(mode="after")
    def _generator(self):
        bad = [("n", None, self.__pydantic_fields__["n"].description)] if self.n is None else []
        if self.generator == "diffusion":
            bad += [(k, side, f"Stable Diffusion needs a multiple of 8, e.g. {max(8, side // 8 * 8)} or "
                     f"{max(8, side // 8 * 8 + 8)} (paper: 512)")
                    for k, side in (("height", self.height), ("width", self.width)) if side < 8 or side % 8]
            if problem := diffusion_model_problem(self.model):
                bad.append(("model", self.model, problem))
        refuse(*bad)
        self.image_size = self.image_size or SYNTH_IMAGE_SIZE[self.generator]
        return self


def _option(method: str, key: str):
    """Type and range of option `key` of a method's section, by its name (the harden methods': in 1/255 units)."""
    def a_number(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PydanticCustomError("must", "must be a number")
        return value
    rules = {"steps": dict(ge=1, description=WHOLE), "_p": dict(ge=0, le=1, description="a probability is in [0, 1]"),
             **dict.fromkeys(("eps", "noise_std", "weight"), dict(ge=0, description=NUMBER))}
    if method in methods("harden"):
        rules |= {"eps": dict(ge=0, le=255, description=f"{UNITS} [0, 255]"),
                  "step_size": dict(gt=0, le=255, description=f"{UNITS} (0, 255]")}
    kind = Int if key == "steps" else Annotated[Number, BeforeValidator(a_number)]
    return kind, Field(None, **rules.get("_p" if key.endswith("_p") else key, {}))


OPTIONS = {m: create_model(m, __config__=FORBID, **{k: _option(m, k) for k in option_names(m)})
           for m in list_objectives()}  # each method's section: what its objective's constructor takes
