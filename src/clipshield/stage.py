"""Run a stage's work; known failures become one clear line on stderr and exit code 1."""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from .errors import DataError, Interrupted, ModelError, RemoteError, TrainingError
from .params import ParamsError, check_params
from .ui import console, written

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
    import subprocess

    from .params import load_launch
    launch = load_launch(params)
    if launch.nproc * launch.nnodes <= 1 or "LOCAL_RANK" in os.environ:
        return
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # `python -m pkg.mod`: relaunch the module
    target = ["-m", spec.name, *sys.argv[1:]] if spec is not None and spec.name != "__main__" else sys.argv
    proc = subprocess.Popen(torchrun_command(launch, target))
    while True:  # the ranks report an interruption themselves; SIGTERM is passed on to torchrun (Ctrl-C reaches it)
        try:
            sys.exit(proc.wait())
        except KeyboardInterrupt as e:
            if "SIGTERM" in getattr(e, "how", ""):
                proc.send_signal(signal.SIGTERM)


def _terminated(signum, frame):
    raise Interrupted("terminated (SIGTERM)")


def interruption_message(e: KeyboardInterrupt) -> str:
    """One true line on what an interrupted stage kept and what rerunning it does."""
    how, note, rerun = (e.how, e.note, e.rerun) if isinstance(e, Interrupted) else ("interrupted", "", "")
    whole = "each output is written whole at its end; half-written data sets were removed"
    kept = (f"already written: {', '.join(written)}; nothing else was written ({whole})" if written else
            f"no model, metrics or data set was written ({whole})")
    if os.environ.get("DVC_STAGE"):  # dvc repro removes a stage's outputs before it runs it
        kept += f"; `dvc repro` had already removed the outputs of stage {os.environ['DVC_STAGE']} before it ran"
    else:
        kept += f" and the {'other ' if written else ''}outputs from before are unchanged"
    return f"{how}: " + "; ".join(x for x in (note, kept, rerun or "rerunning the stage starts it over") if x)


TIMES_DIR = Path("times")


def arguments(doc: str, keys: tuple[str, ...] = (), paths: tuple[str, ...] = ()):
    """A stage script's command line, as dvc.yaml's cmd gives it: the stage's matrix keys (positional, e.g. TRIGGER
    SEED), then every input and output path (--NAME PATH, all required)."""
    import argparse
    parser = argparse.ArgumentParser(description=doc)
    for key in keys:
        parser.add_argument(key)
    for path in paths:
        parser.add_argument(f"--{path}", required=True, metavar="PATH")
    return parser.parse_args()


def stage_name(argv: list[str]) -> str:
    """The DVC stage a script runs as, from its matrix keys: `stages/clean.py blended par 0 --start ...`
    -> clean@blended-par-0."""
    from itertools import takewhile
    keys = list(takewhile(lambda a: not a.startswith("--"), argv[1:]))
    return Path(argv[0]).stem + ("@" + "-".join(keys) if keys else "")


def machine() -> dict:
    """The CPU this process runs on (model name, logical cores, AVX-512; None where /proc/cpuinfo is missing)."""
    import platform
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.partition(":")[2].strip() for line in info.splitlines() if line.startswith("model name")), "")
    return {"cpu": name or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "avx512": "avx512f" in info.split() if info else None}


def record_time(name: str, times_dir: Path = TIMES_DIR) -> float:
    """Write this process's wall time so far (imports included) and the machine's CPU to times/<stage>.json: the
    report's time table, and the CPU docs/results.md names beside it."""
    import json
    import time

    import psutil
    seconds = round(time.time() - psutil.Process().create_time(), 1)
    times_dir.mkdir(exist_ok=True)
    (times_dir / f"{name}.json").write_text(json.dumps({"stage": name, "seconds": seconds, **machine()}) + "\n")
    return seconds


def run(work, params: str | Path | None = "params.yaml", distributed: bool = False, timed: bool = True) -> None:
    """Validate the whole params file (every problem at once), then do `work` (a training stage with
    `distributed`: under torchrun when train.nproc > 1). Ctrl-C and SIGTERM stop it the same way. A stage script
    (stages/*.py) records its wall time in times/ (the report's time table) unless not `timed`."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    written.clear()
    try:
        _run(work, params, distributed, timed)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(work, params, distributed: bool, timed: bool) -> None:
    try:
        if params is not None and Path(params).exists():
            check_params(params)
            if distributed:
                launch_distributed(params)
        work()
        if timed and Path(sys.argv[0]).parent.name == "stages" and os.environ.get("LOCAL_RANK", "0") == "0":
            record_time(stage_name(sys.argv))
    except EXPECTED as e:
        # One unwrapped line, no markup: messages quote params and lists verbatim.
        console.print(f"error: {e}", style="bold red", highlight=False, soft_wrap=True, markup=False)
        sys.exit(1)
    except KeyboardInterrupt as e:
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun rank 0 speaks for all (it keeps the checkpoint)
            console.print(interruption_message(e), style="bold red", highlight=False, soft_wrap=True, markup=False)
        sys.exit(143 if "SIGTERM" in getattr(e, "how", "") else 130)
