"""Run a stage's work; known failures become one clear line on stderr and exit code 1."""
from __future__ import annotations

import sys
from pathlib import Path

from .data.shards import DataError
from .models import ModelError
from .params import ParamsError, check_params
from .registry import RemoteError
from .training import TrainingError
from .ui import console

EXPECTED = (DataError, ModelError, ParamsError, TrainingError, ValueError, FileNotFoundError, RemoteError)


def torchrun_command(launch, target: list[str]) -> list[str]:
    """The torchrun command line that runs `target` (python arguments) with `launch` (train section).

    One machine: `--standalone` (a private rendezvous on a free port). Several (train.nnodes): every machine runs
    the same stage command; torchrun's c10d rendezvous at train.rdzv_endpoint (served by the agent on that host)
    gathers them, assigns node ranks and global ranks, and the run id (a hash of the command) keeps two stages
    from joining each other's group."""
    import hashlib
    import sys

    nproc = f"--nproc_per_node={launch.nproc}"
    if launch.nnodes <= 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", nproc, *target]
    key = [Path(target[0]).name, *target[1:]]  # the script's name, not its path: the same on every machine
    run_id = "clipshield-" + hashlib.md5(" ".join(key).encode()).hexdigest()[:12]
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={launch.nnodes}", nproc, "--rdzv-backend=c10d",
            f"--rdzv-endpoint={launch.rdzv_endpoint}", f"--rdzv-id={run_id}", *target]


def launch_distributed(params: str | Path) -> None:
    """With train.nproc > 1 or train.nnodes > 1 outside torchrun, run this same command under torchrun and exit with
    its code (check_params has refused an nproc larger than the devices, or nnodes > 1 without an endpoint)."""
    import os
    import subprocess

    from .params import load_launch
    launch = load_launch(params)
    if launch.world_size <= 1 or "LOCAL_RANK" in os.environ:
        return
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # `python -m pkg.mod`: relaunch the module
    target = ["-m", spec.name, *sys.argv[1:]] if spec is not None and spec.name != "__main__" else sys.argv
    sys.exit(subprocess.run(torchrun_command(launch, target)).returncode)


TIMES_DIR = Path("times")


def stage_name(argv: list[str]) -> str:
    """The DVC stage a script runs as: `stages/clean.py blended par 0` -> clean@blended-par-0."""
    return Path(argv[0]).stem + ("@" + "-".join(argv[1:]) if argv[1:] else "")


def record_time(name: str, times_dir: Path = TIMES_DIR) -> float:
    """Write this process's wall time so far (imports included) to times/<stage>.json: the report's time table."""
    import json
    import time

    import psutil
    seconds = round(time.time() - psutil.Process().create_time(), 1)
    times_dir.mkdir(exist_ok=True)
    (times_dir / f"{name}.json").write_text(json.dumps({"stage": name, "seconds": seconds}) + "\n")
    return seconds


def run(work, params: str | Path | None = "params.yaml", distributed: bool = False) -> None:
    """Validate the whole params file (every problem at once), then do `work` (a training stage with
    `distributed`: under torchrun when train.nproc > 1). A stage script (stages/*.py) records its wall time."""
    import os
    try:
        if params is not None and Path(params).exists():
            check_params(params)
            if distributed:
                launch_distributed(params)
        work()
        if Path(sys.argv[0]).parent.name == "stages" and os.environ.get("LOCAL_RANK", "0") == "0":
            record_time(stage_name(sys.argv))
    except EXPECTED as e:
        # One unwrapped line, no markup: messages quote params and lists verbatim.
        console.print(f"error: {e}", style="bold red", highlight=False, soft_wrap=True, markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] no output was replaced (outputs are written atomically)")
        sys.exit(130)
