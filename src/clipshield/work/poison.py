"""Stage `poison`: the clean train shards with one trigger on round(rate*N) samples, and their manifest."""
from __future__ import annotations

import json
from pathlib import Path

from ..data import shards
from ..ui import console, progress_bar, summary


def poison(trigger: str, attack, p, data_dir, out_dir) -> dict:
    """Write `out_dir` (data/poisoned/<trigger>): the clean train shards `data_dir` with round(rate*N) samples
    poisoned, plus manifest.jsonl listing exactly the poisoned samples."""
    from ..attacks.poison import poison_stream
    from ..attacks.triggers import get_trigger
    from ..data.classes import classes_file, read_classes
    get_trigger(trigger)  # an unknown name first: no other message would help
    if trigger not in attack.triggers:
        console.print(f"[yellow]note:[/] trigger {trigger} is not in attack.triggers {attack.triggers}")
    out_dir = Path(out_dir)
    n = shards.num_samples(data_dir)
    if round(p.rate * n) == 0:
        raise shards.DataError(f"poison.rate = {p.rate:g} poisons round({p.rate:g} x {n}) = 0 of the {n} samples of "
                               f"{data_dir}: {out_dir} would be an unpoisoned copy and its backdoor would not take; "
                               f"raise poison.rate (e.g. 0.05) or poison a larger data set")
    per_shard = max(json.loads((Path(data_dir) / "sizes.json").read_text()).values())
    manifest: list[dict] = []
    options = attack.options.get(trigger, {})
    with progress_bar(f"poison {trigger}", total=n) as advance:
        def counted(samples):
            for s in samples:
                advance()
                yield s
        classes = read_classes(data_dir)
        stream = poison_stream(counted(shards.iter_samples(data_dir, decode=False)), n, trigger, p.rate,
                               attack.target, p.seed, options, manifest, classes=classes)
        shards.write_shards(stream, out_dir, prefix="train", per_shard=per_shard,
                            extra_files=classes_file(classes))
    manifest.sort(key=lambda r: r["key"])
    (out_dir / "manifest.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in manifest))
    summary(f"poison {trigger}", {"samples": n, "poisoned": len(manifest), "rate": p.rate, "target": attack.target,
                                  "options": json.dumps(options)})
    return {"samples": n, "poisoned": len(manifest)}
