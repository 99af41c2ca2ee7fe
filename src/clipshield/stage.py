"""Run a stage's work; known failures become one clear line on stderr and exit code 1."""
from __future__ import annotations

import sys
from pathlib import Path

from .data.shards import DataError
from .models import ModelError
from .params import ParamsError, check_params
from .training import TrainingError
from .ui import console

EXPECTED = (DataError, ModelError, ParamsError, TrainingError, ValueError, FileNotFoundError)


def run(work, params: str | Path | None = "params.yaml") -> None:
    """Validate the whole params file (every problem at once), then do `work`."""
    try:
        if params is not None and Path(params).exists():
            check_params(params)
        work()
    except EXPECTED as e:
        # One unwrapped line, no markup: messages quote params and lists verbatim.
        console.print(f"error: {e}", style="bold red", highlight=False, soft_wrap=True, markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] no output was replaced (outputs are written atomically)")
        sys.exit(130)
