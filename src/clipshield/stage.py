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


def launch_distributed(params: str | Path) -> None:
    """With train.nproc > 1 outside torchrun, run this same command under torchrun and exit with its code
    (check_params has refused an nproc larger than the devices)."""
    import os
    import subprocess

    from .params import load_launch
    nproc = load_launch(params).nproc
    if nproc <= 1 or "LOCAL_RANK" in os.environ:
        return
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # `python -m pkg.mod`: relaunch the module
    target = ["-m", spec.name, *sys.argv[1:]] if spec is not None and spec.name != "__main__" else sys.argv
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]
    sys.exit(subprocess.run(cmd).returncode)


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
