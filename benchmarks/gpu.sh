#!/usr/bin/env bash
# The GPU checks in one run on a GPU machine (an H100 or H200; docs/decisions.md#scale): the training loop's
# samples/s per objective (ViT-B-32, batch 256, bf16) with and without decoding threads, the loop against a bare
# open_clip loop, the diffusion stage against a plain diffusers loop (SD v1.5's architecture), and the miniature
# paper run (tests/test_paper_run.py) with CUDA. Logs go to $OUT (or ./gpu-out). T_OBJ, T_RATIO, T_DIFF, T_PAPER: seconds
# allowed to each part (0 skips it; note that `timeout 0` would mean no limit at all).
#
# The device machine has torch but not clipshield's other packages: carry them as cp312 wheels in .whl/ (listed by
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ...` for every package of clipshield's
# dependency closure that the machine's image lacks; antlr4-python3-runtime 4.9.3 is an sdist: `pip wheel` it).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
  mkdir -p /tmp/bin && ln -sf "$(command -v python3)" /tmp/bin/python
  printf '#!/bin/sh\nexec python3 -m clipshield.cli "$@"\n' >/tmp/bin/clipshield && chmod +x /tmp/bin/clipshield
  export PATH=/tmp/bin:/tmp/site/bin:$PATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, open_clip, diffusers, dvc; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'diffusers', diffusers.__version__, 'cpus', __import__('os').cpu_count())"

python3 - <<'PY'   # the benchmark world at 224 px, made once
from clipshield.data import shards
from clipshield.pipeline import world_samples
shards.write_shards(world_samples("base", 0, 1024, 224, "b"), "/tmp/w224", prefix="train", per_shard=256)
PY
[ "${T_OBJ:-150}" = 0 ] || timeout ${T_OBJ:-150} python3 benchmarks/train_step.py --data /tmp/w224 --objectives clip,par,fare --model ViT-B-32 \
  --batch 256 --bf16 --steps 15 --rounds 2 --loader-threads 0,8 2>&1 | grep -v "^\s*$" | tee "$OUT/objectives.log" | grep samples/s
[ "${T_RATIO:-80}" = 0 ] || timeout ${T_RATIO:-80} python3 benchmarks/train_step.py --data /tmp/w224 --model ViT-B-32 --batch 256 --bf16 --steps 15 \
  --rounds 2 --loader-threads 8 2>&1 | tee "$OUT/ratio.log" | grep "samples/s\|ratio\|model"
[ "${T_DIFF:-160}" = 0 ] || timeout ${T_DIFF:-160} python3 benchmarks/diffusion.py 2>&1 | tee "$OUT/diffusion.log" | grep -v "Loading\|Writing\|should be kept"
[ "${T_PAPER:-270}" = 0 ] || timeout ${T_PAPER:-270} python3 -m pytest -q -x -p no:cacheprovider tests/test_paper_run.py 2>&1 | tee "$OUT/paper.log" | tail -15
