"""Sampling wall time: the calibexport runtime on ONNX Runtime against PyTorch, in one process.

Every contender runs the same numpy solver loop (``calibexport.runtime.solvers.solve``) from the
same noise; only the eps backend differs:

* ``onnxruntime``: the built artifact's ``model.onnx`` (eta folded in) through ONNX Runtime;
* ``torch-eager``: the PyTorch network minus eta (``TorchCalibratedBackend``);
* ``torch-compile``: the same with ``torch.compile`` applied to the network, when it works here;
* ``null``: a backend that returns a preallocated array, which measures the loop's own cost
  (schedule, solver arithmetic, copies) so its share of the real loop time can be reported.

Runs are interleaved (each repeat runs every contender once) and medians are reported.

    .venv/bin/python benchmarks/sampling_speed.py --artifact demo-output/build \\
        --model examples/digits/digits.safetensors --out benchmarks/results/sampling_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np


class NullBackend:
    """An eps backend that costs nothing, for measuring the solver loop alone."""

    name = "null"

    def __init__(self, image_shape: tuple[int, int, int], timestep_dtype: np.dtype) -> None:
        self.image_shape = image_shape
        self.timestep_dtype = timestep_dtype
        self._out: dict[int, np.ndarray] = {}

    def eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        out = self._out.get(x.shape[0])
        if out is None:
            out = self._out[x.shape[0]] = np.zeros(x.shape, dtype=np.float32)
        return out

    def close(self) -> None:
        pass


def time_run(backend, schedule, batch: int, steps: int, order: int, method: str) -> float:
    from calibexport.runtime.noise import initial_noise
    from calibexport.runtime.sampler import make_eps_fn
    from calibexport.runtime.solvers import solve

    x_T = initial_noise(0, np.arange(batch), tuple(backend.image_shape))
    eps_fn = make_eps_fn(backend, schedule)
    start = time.perf_counter()
    solve(eps_fn, x_T, schedule, steps=steps, order=order, method=method)
    return time.perf_counter() - start


def make_contenders(args: argparse.Namespace) -> dict:
    import torch

    from calibexport.models.loaders import load_model
    from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from calibexport.runtime.eta_table import load_eta_table
    from calibexport.validate.torch_reference import TorchCalibratedBackend

    torch.set_num_threads(args.threads)
    ort_backend = OnnxRuntimeBackend(args.artifact / "model.onnx", intra_op_threads=args.threads)
    loaded = load_model(args.model)
    table = load_eta_table(args.artifact / "eta.npy")
    shape = ort_backend.image_shape
    contenders = {
        "onnxruntime": ort_backend,
        "torch-eager": TorchCalibratedBackend(loaded.module, table, shape),
        "null": NullBackend(shape, ort_backend.timestep_dtype),
    }
    if not args.no_compile:
        try:
            compiled = torch.compile(loaded.module)
            backend = TorchCalibratedBackend(compiled, table, shape)
            backend.eps(np.zeros((1, *shape), np.float32), np.zeros(1, np.float32))
            contenders["torch-compile"] = backend
        except Exception as error:  # torch.compile needs a C++ toolchain and may fail here
            print(f"torch.compile unavailable: {type(error).__name__}: {error}".splitlines()[0])
    return contenders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=Path("demo-output/build"))
    parser.add_argument("--model", type=Path, default=Path("examples/digits/digits.safetensors"))
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--order", type=int, default=3)
    parser.add_argument("--method", default="singlestep")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling_speed.json"))
    args = parser.parse_args()

    from calibexport.runtime.artifact import load_manifest
    from calibexport.runtime.schedule import schedule_from_spec

    schedule = schedule_from_spec(load_manifest(args.artifact).schedule)
    contenders = make_contenders(args)
    results = {}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        # One warm-up run each, then interleaved repeats.
        for backend in contenders.values():
            time_run(backend, schedule, batch, args.steps, args.order, args.method)
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, backend in contenders.items():
                times[name].append(time_run(backend, schedule, batch, args.steps, args.order, args.method))
        medians = {name: statistics.median(values) for name, values in times.items()}
        eager = medians["torch-eager"]
        results[str(batch)] = {
            "median_seconds": medians,
            "all_seconds": times,
            "ratio_to_torch_eager": {name: medians[name] / eager for name in medians},
            "loop_share_of_onnxruntime_run": medians["null"] / medians["onnxruntime"],
        }
        print(f"batch {batch}: " + ", ".join(f"{n} {m * 1000:.1f} ms" for n, m in medians.items()))
        print(f"  onnxruntime / torch-eager = {medians['onnxruntime'] / eager:.3f}; "
              f"loop share = {100 * medians['null'] / medians['onnxruntime']:.2f}%")

    record = {
        "command": "python benchmarks/sampling_speed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not isinstance(v, bool)),
        "machine": {"processor_count": os.cpu_count(), "machine": platform.machine(),
                    "python": platform.python_version(), "load_average": os.getloadavg()},
        "settings": {"steps": args.steps, "order": args.order, "method": args.method,
                     "threads": args.threads, "repeats": args.repeats},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
