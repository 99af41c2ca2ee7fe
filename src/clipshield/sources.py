"""Where the weights a params file names come from, checked before anything runs: a CLIP model config
(clipshield's in src/clipshield/configs, or open_clip's) and a Stable Diffusion pipeline (a local diffusers
folder or a Hugging Face hub id)."""
from __future__ import annotations

import json
import re
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")  # clipshield's model configs (models.register_configs)
HUB_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+"  # a Hugging Face hub id: org/name


def clip_config(name: str) -> dict | None:
    """Model config `name`: clipshield's (src/clipshield/configs) or open_clip's; None if neither has it."""
    if (CONFIG_DIR / f"{name}.json").is_file():
        return json.loads((CONFIG_DIR / f"{name}.json").read_text())
    import open_clip  # slow to import: only for a name that is not clipshield's
    return open_clip.get_model_config(name)


def diffusion_model_problem(model: str | None) -> str | None:
    """What is wrong with synth.model as a diffusers pipeline (None: nothing we can see before loading it)."""
    name = model.strip() if model else ""
    path = Path(name).expanduser()
    if not name:
        return "set it to a local diffusers pipeline folder (with model_index.json) or a hub id such as " \
               "runwayml/stable-diffusion-v1-5"
    if path.is_dir() and not (path / "model_index.json").is_file():
        return "it is a folder without model_index.json; point it at a diffusers pipeline folder (written by " \
               "save_pretrained)"
    if not path.is_dir() and not re.fullmatch(HUB_ID, name):
        return f"model folder {path} does not exist; create it (pipeline.save_pretrained) or set synth.model to an " \
               f"existing folder or hub id"
    return None
