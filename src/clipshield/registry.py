"""The model registry (dvc.yaml `artifacts:`, generated from params.yaml) and remote storage commands.

Every final model of the pipeline is a DVC artifact named like its folder (under models/ in dvc.yaml), with labels
for its attack, trigger and defence; `clipshield get NAME` (or `dvc artifacts get REPO NAME`) fetches it.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from .errors import RemoteError
from .params import final_models, read_yaml


MARKER = "# Model registry: generated from params.yaml by `clipshield registry` (do not edit by hand)."


def artifacts_block(params: dict, models: str) -> str:
    return MARKER + "\n" + yaml.safe_dump({"artifacts": final_models(params, models)}, sort_keys=False, width=120)


def sync_artifacts(dvc_yaml: str | Path, params_path: str | Path, models: str) -> int:
    """Rewrite the generated `artifacts:` block at the end of dvc.yaml (models in folder `models`); returns the
    number of artifacts."""
    dvc_yaml = Path(dvc_yaml)
    text = dvc_yaml.read_text()
    head = text.split(MARKER)[0].rstrip("\n") + "\n\n"
    params = read_yaml(params_path)
    dvc_yaml.write_text(head + artifacts_block(params, models))
    return len(final_models(params, models))


def declared(repo: str | Path = ".") -> dict:
    path = Path(repo) / "dvc.yaml"
    if not path.exists():
        raise ValueError(f"{repo} has no dvc.yaml; give the path or URL of a clipshield repository")
    return (yaml.safe_load(path.read_text()) or {}).get("artifacts") or {}


def get(name: str, models: str, repo: str = ".", out: str | None = None, rev: str | None = None,
        version: str | None = None) -> None:
    """Fetch a registered model by name. With `version` (a GTO tag `NAME@vX.Y.Z` in the repo), through
    `dvc artifacts get`; otherwise the artifact's path at `rev` (default: HEAD) through `dvc get` (`MODELS/NAME` in
    a repository that is not a local folder). An unknown name lists the registered ones."""
    path = f"{models}/{name}"
    if Path(repo).exists():
        known = declared(repo)
        if name not in known:
            raise ValueError(f"no artifact named {name!r} in {repo}/dvc.yaml; registered: {', '.join(known)}")
        path = known[name]["path"]
    if version:
        cmd = ["dvc", "artifacts", "get", str(repo), name, "--rev", version]
    else:
        cmd = ["dvc", "get", str(repo), path] + (["--rev", rev] if rev else [])
    _dvc(cmd + (["-o", out] if out else []))


def _dvc(cmd: list[str], remote: str | None = None) -> None:
    r = subprocess.run(cmd)
    if r.returncode != 0:
        where = f"remote {remote!r}" if remote else "the default remote"
        raise RemoteError(
            f"`{' '.join(cmd)}` failed (DVC's message is above). Check {where}: `dvc remote list` shows the "
            f"remotes; the default local one needs no setup (`dvc remote default local`); for S3 set the URL "
            f"and credentials: `dvc remote modify s3 url s3://BUCKET/PATH`, `dvc remote modify --local s3 "
            f"access_key_id ...` and `secret_access_key ...` (or AWS_* environment variables), and "
            f"`dvc remote modify s3 endpointurl URL` for a non-AWS server; see README, 'Pull a versioned model'")


def transfer(verb: str, remote: str | None = None, targets: list[str] | None = None) -> None:
    """dvc push / pull with a hint on how to configure the remote when it fails."""
    cmd = ["dvc", verb] + (["-r", remote] if remote else []) + list(targets or [])
    _dvc(cmd, remote)
