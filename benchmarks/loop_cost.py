"""The solver loop's own cost at several image sizes, without any network.

Runs the calibexport loop around ``sampling_speed.NullBackend`` (a network that costs nothing
but keeps every backend's input checks) on the DDPM linear schedule, for each method, image
shape and batch size, and reports the median time of one sampling run.

    .venv/bin/python benchmarks/loop_cost.py --out benchmarks/results/loop_cost.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench_common import machine_facts, positive_int, positive_ints, write_record
from sampling_speed import NullBackend, loop_runner

SHAPES = {"digits": (1, 16, 16), "celeba64": (3, 64, 64)}
METHODS = (("singlestep", 3), ("multistep", 3), ("ddim", 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--batch-sizes", type=positive_ints, default="1,16")
    parser.add_argument("--repeats", type=positive_int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loop_cost.json"))
    args = parser.parse_args()

    from calibexport.runtime.schedule import DiscreteVPSchedule

    schedule = DiscreteVPSchedule.linear()
    results: dict[str, Any] = {}
    for shape_name, shape in SHAPES.items():
        backend = NullBackend(shape, np.dtype(np.float32))
        for method, order in METHODS:
            settings = argparse.Namespace(steps=args.steps, order=order, method=method)
            run = loop_runner(backend, schedule, settings)
            for batch in args.batch_sizes:
                x_T = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
                run(x_T)  # warm-up, which also builds and caches the step plan
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    run(x_T)
                    times.append(time.perf_counter() - start)
                key = f"{shape_name},{method},batch={batch}"
                results[key] = {"median_ms": float(np.median(times)) * 1e3,
                                "min_ms": min(times) * 1e3}
                print(f"{key}: {results[key]['median_ms']:.3f} ms", flush=True)
    write_record(args.out, {"machine": machine_facts(), "steps": args.steps, "results": results})


if __name__ == "__main__":
    main()
