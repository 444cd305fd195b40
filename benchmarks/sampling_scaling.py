"""Growth of sampling time with batch size and the number of network evaluations (NFE).

For each batch size and NFE, times the calibexport loop on ONNX Runtime, the same loop on
PyTorch eager and the loop alone (a zero-cost network, ``sampling_speed.NullBackend``), in one
process with one thread count. Reports the median time per run, per image and per evaluation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampling_scaling.py \\
        --out benchmarks/results/sampling_scaling.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from bench_common import (
    machine_facts, medians, positive_int, positive_ints, require_artifact, timed_blocks,
    write_record,
)
from sampling_speed import NullBackend, loop_runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=Path("demo-output/build"))
    parser.add_argument("--model", type=Path, default=Path("examples/digits/digits.safetensors"))
    parser.add_argument("--batch-sizes", type=positive_ints, default="1,4,16,64")
    parser.add_argument("--nfe", type=positive_ints, default="10,20,50")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--order", type=int, choices=[1, 2, 3], default=3)
    parser.add_argument("--method", default="singlestep",
                        choices=["singlestep", "singlestep_fixed", "multistep", "ddim"])
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--block", type=positive_int, default=3)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/sampling_scaling.json"))
    args = parser.parse_args()

    import torch

    from calibexport.models.loaders import load_model
    from calibexport.runtime.artifact import load_manifest
    from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from calibexport.runtime.eta_table import load_eta_table
    from calibexport.runtime.noise import initial_noise
    from calibexport.runtime.schedule import schedule_from_spec
    from calibexport.validate.torch_reference import TorchCalibratedBackend

    torch.set_num_threads(args.threads)
    require_artifact(args.artifact)
    manifest = load_manifest(args.artifact)
    schedule = schedule_from_spec(manifest.schedule)
    shape = tuple(manifest.image_shape)
    ort_backend = OnnxRuntimeBackend(args.artifact / "model.onnx", intra_op_threads=args.threads)
    backends = {
        "onnxruntime": ort_backend,
        "torch-eager": TorchCalibratedBackend(load_model(args.model).module,
                                              load_eta_table(args.artifact / "eta.npy"), shape),
        "loop-alone": NullBackend(shape, ort_backend.timestep_dtype),
    }
    before = machine_facts()
    results: dict[str, Any] = {}
    for nfe in args.nfe:
        settings = argparse.Namespace(steps=nfe, order=args.order, method=args.method)
        runners = {name: loop_runner(b, schedule, settings) for name, b in backends.items()}
        for batch in args.batch_sizes:
            x_T = initial_noise(0, np.arange(batch), shape)
            calls = {name: (lambda run=run: run(x_T)) for name, run in runners.items()}
            med = medians(timed_blocks(calls, args.rounds, args.block))
            key = f"nfe={nfe},batch={batch}"
            results[key] = {
                "median_ms": {n: m * 1e3 for n, m in med.items()},
                "ms_per_image": {n: m * 1e3 / batch for n, m in med.items()},
                "ms_per_evaluation": {n: m * 1e3 / nfe for n, m in med.items()},
                "onnxruntime_over_torch_eager": med["onnxruntime"] / med["torch-eager"],
                "loop_share_of_onnxruntime_run": med["loop-alone"] / med["onnxruntime"],
            }
            print(f"{key}: " + ", ".join(f"{n} {m * 1e3:.1f} ms" for n, m in med.items()),
                  flush=True)
    write_record(args.out, {"machine_before": before, "machine_after": machine_facts(),
                            "settings": {"threads": args.threads, "order": args.order,
                                         "method": args.method, "rounds": args.rounds,
                                         "block": args.block},
                            "results": results})


if __name__ == "__main__":
    main()
