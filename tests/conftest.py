"""Shared test setup: offline Hugging Face hub and one torch thread (the machine has 2 busy cores)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A scratch project: the repository's params.yaml and profiles/ in a temporary working directory."""
    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(repo / "profiles", tmp_path / "profiles")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE", raising=False)  # as outside `dvc repro`, whatever runs the tests
    return tmp_path
