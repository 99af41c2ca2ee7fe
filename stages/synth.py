"""DVC stage `synth`: synthetic image-text pairs into data/synth (params: the `synth:` section).

Under torchrun each process reads RANK / WORLD_SIZE and makes its own shards; the last one to
finish writes data/synth/sizes.json. Re-running resumes: complete shards are kept.
"""
from __future__ import annotations

import os
import sys

import yaml

from clipshield.data.synth import generate
from clipshield.params import check_params

OUT = "data/synth"


def main() -> int:
    with open("params.yaml") as f:
        params = yaml.safe_load(f) or {}
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    try:
        check_params("params.yaml")
        r = generate(params.get("synth"), OUT, rank, world_size)
    except ValueError as e:  # bad params or data: one clear line, no traceback
        print(f"synth: error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        from clipshield.stage import record_time
        record_time("synth")
    print(f"synth: rank {r['rank']}/{r['world_size']} {r['generator']} n={r['n']} "
          f"shards={r['shards']} generated={r['generated']} skipped={r['skipped']} "
          f"images={r['images']} ({r['images_per_s']:.3g}/s) "
          f"{'complete: ' + OUT + '/sizes.json' if r['complete'] else 'waiting for other ranks'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
