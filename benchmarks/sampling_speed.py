"""Sampling wall time: the calibexport runtime on ONNX Runtime against PyTorch, in one process.

Contenders, all sampling the same noise with the same network, step count and thread count:

* ``onnxruntime``: the calibexport numpy solver loop (``runtime.solvers.solve``) around the
  built artifact's ``model.onnx`` (eta folded in) in ONNX Runtime;
* ``torch-eager``: the same loop around the PyTorch network minus eta
  (``TorchCalibratedBackend``);
* ``torch-compile``: the same with ``torch.compile`` applied to the network, when it works here;
* ``diffusers``: the peer, the PyTorch network minus eta in diffusers' DPM-Solver scheduler loop
  of the same method and order (``diffusers_peer.py``), when diffusers is installed;
* ``loop-alone``: the calibexport loop around a backend whose network costs nothing but which
  keeps every backend's input checks, so it measures the loop's own cost (schedule, plan, solver
  arithmetic, copies);
* ``diffusers-loop-alone``: the diffusers loop around a zero network, the same for the peer.

Each thread count sets ``torch.set_num_threads`` and opens ONNX Runtime with that many intra-op
threads. Contenders run in blocks (one untimed run, then ``--block`` timed runs), one block of
each per round, alternating the order; medians are reported.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampling_speed.py --threads 1,2 \\
        --out benchmarks/results/sampling_speed.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench_common import (
    machine_facts, medians, positive_int, positive_ints, require_artifact, timed_blocks,
    write_record,
)
from calibexport.runtime.backends.base import EpsBackend


class NullBackend(EpsBackend):
    """An eps backend whose network costs nothing, for measuring the solver loop alone.

    It keeps the input checks of every backend (``EpsBackend.eps``), so they count as loop cost.
    """

    name = "null"

    def __init__(self, image_shape: tuple[int, int, int], timestep_dtype: np.dtype) -> None:
        self.image_shape = image_shape
        self.timestep_dtype = timestep_dtype
        self._out: dict[int, np.ndarray] = {}

    def _eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        out = self._out.get(x.shape[0])
        if out is None:
            out = self._out[x.shape[0]] = np.zeros(x.shape, dtype=np.float32)
        return out


def loop_runner(backend: EpsBackend, schedule: Any, args: argparse.Namespace
                ) -> Callable[[np.ndarray], np.ndarray]:
    """Return a function that samples from x_T with the calibexport solver loop."""
    from calibexport.runtime.sampler import make_eps_fn
    from calibexport.runtime.solvers import solve

    eps_fn = make_eps_fn(backend, schedule)
    return lambda x_T: solve(eps_fn, x_T, schedule, steps=args.steps, order=args.order,
                             method=args.method)


def open_contenders(args: argparse.Namespace, manifest: Any, threads: int
                    ) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Open every contender with ``threads`` threads; return name -> sample(x_T)."""
    import torch

    from calibexport.models.loaders import load_model
    from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from calibexport.runtime.eta_table import load_eta_table
    from calibexport.runtime.schedule import schedule_from_spec
    from calibexport.validate.torch_reference import TorchCalibratedBackend

    torch.set_num_threads(threads)
    schedule = schedule_from_spec(manifest.schedule)
    ort_backend = OnnxRuntimeBackend(args.artifact / "model.onnx", intra_op_threads=threads)
    module = load_model(args.model).module
    table = load_eta_table(args.artifact / "eta.npy")
    shape = ort_backend.image_shape
    runners = {
        "onnxruntime": loop_runner(ort_backend, schedule, args),
        "torch-eager": loop_runner(TorchCalibratedBackend(module, table, shape), schedule, args),
    }
    if not args.no_compile:
        try:
            backend = TorchCalibratedBackend(torch.compile(module), table, shape)
            backend.eps(np.zeros((1, *shape), np.float32), np.zeros(1, np.float32))
            runners["torch-compile"] = loop_runner(backend, schedule, args)
        except Exception as error:  # torch.compile needs a C++ toolchain and may fail here
            print(f"torch.compile unavailable: {type(error).__name__}: {error}".splitlines()[0])
    peer = None
    try:
        from diffusers_peer import DiffusersLoop, make_scheduler

        scheduler = make_scheduler(args.method, args.order, manifest.schedule)
        peer = DiffusersLoop(scheduler, module, table.values, args.steps)
        runners["diffusers"] = peer.run
    except ImportError as error:
        print(f"diffusers unavailable: {error}")
    runners["loop-alone"] = loop_runner(NullBackend(shape, ort_backend.timestep_dtype), schedule,
                                        args)
    if peer is not None:
        alone = DiffusersLoop(make_scheduler(args.method, args.order, manifest.schedule), None,
                              None, args.steps)
        runners["diffusers-loop-alone"] = alone.run
    return runners


def summarize(med: dict[str, float]) -> dict[str, Any]:
    eager = med["torch-eager"]
    summary: dict[str, Any] = {
        "median_ms": {name: m * 1e3 for name, m in med.items()},
        "ratio_to_torch_eager": {name: m / eager for name, m in med.items()},
        "loop_share_of_onnxruntime_run": med["loop-alone"] / med["onnxruntime"],
    }
    if "diffusers" in med:
        summary["loop_share_of_diffusers_run"] = med["diffusers-loop-alone"] / med["diffusers"]
        summary["onnxruntime_over_diffusers"] = med["onnxruntime"] / med["diffusers"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=Path("demo-output/build"))
    parser.add_argument("--model", type=Path, default=Path("examples/digits/digits.safetensors"))
    parser.add_argument("--batch-sizes", type=positive_ints, default="1,16")
    parser.add_argument("--threads", type=positive_ints, default="1,2",
                        help="thread counts, comma-separated")
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--order", type=int, choices=[1, 2, 3], default=3)
    parser.add_argument("--method", default="singlestep", choices=["singlestep", "multistep"])
    parser.add_argument("--rounds", type=positive_int, default=4)
    parser.add_argument("--block", type=positive_int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling_speed.json"))
    args = parser.parse_args()

    from calibexport.runtime.artifact import load_manifest
    from calibexport.runtime.noise import initial_noise

    require_artifact(args.artifact)
    manifest = load_manifest(args.artifact)
    before = machine_facts()
    results: dict[str, Any] = {}
    for threads in args.threads:
        runners = open_contenders(args, manifest, threads)
        for batch in args.batch_sizes:
            x_T = initial_noise(0, np.arange(batch), tuple(manifest.image_shape))
            calls = {name: (lambda run=run: run(x_T)) for name, run in runners.items()}
            times = timed_blocks(calls, args.rounds, args.block)
            key = f"threads={threads},batch={batch}"
            results[key] = {**summarize(medians(times)), "all_seconds": times}
            med = results[key]["median_ms"]
            print(f"{key}: " + ", ".join(f"{n} {m:.2f} ms" for n, m in med.items()), flush=True)
            print(f"  onnxruntime / torch-eager = "
                  f"{results[key]['ratio_to_torch_eager']['onnxruntime']:.3f}; loop share = "
                  f"{100 * results[key]['loop_share_of_onnxruntime_run']:.2f}%", flush=True)
    write_record(args.out, {
        "machine_before": before, "machine_after": machine_facts(),
        "settings": {"steps": args.steps, "order": args.order, "method": args.method,
                     "rounds": args.rounds, "block": args.block},
        "results": results,
    })


if __name__ == "__main__":
    main()
