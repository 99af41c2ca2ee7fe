"""Model configs, creation, and open_clip `local-dir` folders (config + safetensors + provenance).

Images enter clipshield's code in [0, 1]; `encode_images` applies the model's mean/std, so attacks
and triggers always work in pixel space while the saved weights stay stock open_clip.
"""
from __future__ import annotations

import contextlib
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from .errors import ModelError
from .files import atomic_path, json_object

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
PROVENANCE_FILE = "provenance.json"
TOKEN_CACHE = 200_000  # captions whose token ids a model keeps (200k x 77 int64: 120 MB at most)


def register_configs() -> list[str]:
    """Register clipshield's JSON model configs with open_clip (idempotent)."""
    names = []
    for path in sorted(CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(path)
        names.append(path.stem)
    return names


register_configs()


@dataclass
class Clip:
    """An open_clip model with its tokenizer and pixel normalisation."""
    model: torch.nn.Module
    tokenizer: object
    model_cfg: dict
    preprocess_cfg: dict
    name: str
    _tokens: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg["size"]
        return size if isinstance(size, int) else size[0]

    def encode_images(self, x01: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        mean = torch.tensor(self.preprocess_cfg["mean"], device=x01.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess_cfg["std"], device=x01.device).view(1, 3, 1, 1)
        return self.model.encode_image((x01 - mean) / std, normalize=normalize)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids (N, context); each caption is tokenised once and remembered (captions repeat across epochs, and
        BPE in Python costs ~5 ms per batch of 128), up to TOKEN_CACHE captions."""
        missing = list(dict.fromkeys(c for c in captions if c not in self._tokens))
        if missing:
            if len(self._tokens) + len(missing) > TOKEN_CACHE:
                self._tokens.clear()
            self._tokens.update(zip(missing, self.tokenizer(missing)))
        return torch.stack([self._tokens[c] for c in captions])

    def encode_texts(self, captions: list[str], normalize: bool = False, device=None) -> torch.Tensor:
        tokens = self.tokenize(captions).to(device or next(self.model.parameters()).device)
        return self.model.encode_text(tokens, normalize=normalize)


def _preprocess_cfg(model_cfg: dict) -> dict:
    size = model_cfg["vision_cfg"]["image_size"]
    return {"size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


@contextlib.contextmanager
def errors_only():
    """Python logging at ERROR and above only, for the block."""
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.getLogger().setLevel(level)


def create(name: str, pretrained: str | None = None, seed: int = 0) -> Clip:
    """A fresh model from a registered config (random init under `seed`), or with `pretrained` weights
    (an open_clip tag such as 'openai', or a local .safetensors/.pt file)."""
    if name.startswith("local-dir:"):
        return load(name)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        tiny = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ModelError(f"unknown model config {name!r}; clipshield's tiny configs: {tiny}; "
                         f"open_clip also knows e.g. ViT-B-32, RN50 ({len(open_clip.list_models())} in all)")
    torch.manual_seed(seed)
    try:
        with errors_only():  # open_clip warns that a random init has no weights
            model = open_clip.create_model(name, pretrained=pretrained, weights_only=True)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error type for a torn or foreign file)
        if pretrained is None:
            raise
        why = ("it holds pickled objects other than tensors, which could run code on load: refused"
               if isinstance(e, pickle.UnpicklingError) else
               f"not a valid safetensors file, truncated or another format renamed .safetensors ({_first_line(e)})"
               if str(pretrained).endswith(".safetensors") else _first_line(e))
        raise ModelError(f"cannot load pretrained weights {pretrained!r} for {name}: {why}; clipshield loads "
                         f".safetensors files, open_clip tags, or .pt/.bin files that hold tensors only (torch.load(weights_only=True): pickled code is refused)") from e
    model.eval()
    return Clip(model, open_clip.get_tokenizer(name), cfg, _preprocess_cfg(cfg), name)


def load(spec: str | Path) -> Clip:
    """Load `local-dir:PATH` (or a bare folder path) with stock open_clip; never unpickles."""
    path = Path(str(spec).removeprefix("local-dir:"))
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ModelError(f"{path} is not a model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                         f"run the stage that writes it (`dvc repro`) or fetch it (`dvc pull`)")
    cfg = read_json(path / CONFIG_FILE, "re-create the folder (`dvc repro`) or restore it (`dvc pull`)")
    if not isinstance(cfg.get("model_cfg"), dict) or not isinstance(cfg.get("preprocess_cfg", {}), dict):
        raise ModelError(f"{path / CONFIG_FILE} lacks a `model_cfg` mapping ({{\"model_cfg\": {{...}}, \"preprocess_cfg\": "
                         f"{{...}}}}); re-create the folder (`dvc repro`) or restore it (`dvc pull`)")
    try:  # the config alone first: its errors are not the weights' fault
        with errors_only():  # open_clip warns that the config-only build has no weights
            open_clip.create_model(f"local-dir:{path}", load_weights=False)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{path / CONFIG_FILE} does not describe a model open_clip can build ({_first_line(e)}); "
                         f"re-create the folder (`dvc repro`) or restore it (`dvc pull`)") from e
    try:
        model = open_clip.create_model(f"local-dir:{path}", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a truncated safetensors file, or weights of another config)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if lines and lines[0].startswith("Error(s) in loading state_dict"):
            raise ModelError(f"{path / CONFIG_FILE} does not match the weights in {WEIGHTS_FILE} "
                             f"({lines[1][:200] if len(lines) > 1 else lines[0]}): the config describes another model; "
                             f"restore both files from the same run (`dvc pull`) or re-create the folder (`dvc repro`)") from e
        raise ModelError(f"cannot load weights from {path / WEIGHTS_FILE} ({_first_line(e)}): the file is torn or not "
                         f"a safetensors file; re-create (`dvc repro`) or re-pull (`dvc pull`) it") from e
    model.eval()
    return Clip(model, open_clip.get_tokenizer(f"local-dir:{path}"), cfg["model_cfg"],
                cfg["preprocess_cfg"], read_provenance(path).get("name", path.name))


def save(clip: Clip, out_dir: str | Path, provenance: dict) -> Path:
    """Write an open_clip local-dir folder atomically (a temp folder renamed into place)."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        state = {k: v.detach().cpu().contiguous() for k, v in clip.model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps({"model_cfg": clip.model_cfg, "preprocess_cfg": clip.preprocess_cfg},
                                                  indent=2, sort_keys=True) + "\n")
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    from .ui import wrote
    wrote(out_dir)
    return out_dir


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def read_json(path: Path, fix: str) -> dict:
    """A JSON object from `path`, or a ModelError naming the file and `fix`."""
    return json_object(path.read_bytes(), str(path), fix, ModelError)


def read_provenance(path: str | Path) -> dict:
    p = Path(path) / PROVENANCE_FILE
    return read_json(p, "re-create the folder (`dvc repro`), restore it (`dvc pull`), or delete the file "
                        "(it is metadata only)") if p.exists() else {}


def frozen_copy(clip: Clip) -> Clip:
    """A frozen copy (f^0 in docs/methods.md) of the model a stage starts from."""
    import copy
    model = copy.deepcopy(clip.model).eval().requires_grad_(False)
    return Clip(model, clip.tokenizer, clip.model_cfg, clip.preprocess_cfg, clip.name + "-frozen")
