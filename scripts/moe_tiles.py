"""How hire.moe's thresholds were chosen (docs/hire.md, "Mixture of experts"): decode of --shape moe-1g (random
float32 weights) with each dispatch forced, and the grouped path with each tile, against the all-experts path,
interleaved in each repeat; medians. One JSON line per batch.

    PYTHONPATH=. python scripts/moe_tiles.py STEPS REPEATS '{"8": [["all", 16], ["per-token", 16], ["grouped", 4]]}'

Each entry is [dispatch, tile] (the tile matters to "grouped" only; "all" must come first in each batch).
"""
import functools
import json
import statistics
import sys

from hire import moe
from hire.bench import _decode_timer
from hire.config import SHAPES
from hire.loaded import LoadedModel
from hire.model import init_params

steps, repeats, plan = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
cfg = SHAPES["moe-1g"].replace(dtype="float32", quantize="none")
variables = init_params(cfg)
grouped = moe.grouped
for batch, variants in plan.items():
    batch, timers = int(batch), {}
    for dispatch, tile in variants:
        moe.PATHS["grouped"] = functools.partial(grouped, tile=tile)  # read when the engine compiles, just below
        timer = _decode_timer(LoadedModel(cfg.replace(moe_dispatch=dispatch), variables, None), batch, steps, 16, 32)
        timer()
        timers[f"{dispatch}/{tile}"] = timer
    times = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            times[name].append(timer())
    base = times[f"all/{variants[0][1]}"]
    print(json.dumps({"batch": batch, "load": open("/proc/loadavg").read().split()[:3]} | {
        name: {"tokens_per_s": round(batch * steps / statistics.median(s), 1),
               "vs_all": round(statistics.median(b / t for b, t in zip(base, s)), 3)} for name, s in times.items()}),
          flush=True)
