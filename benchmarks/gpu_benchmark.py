"""GPU benchmark: TensorRT engine build time and the sampling throughput of each GPU backend.

Builds an artifact for a random-weight network (the celeba64 architecture by default: 78.7M
parameters, 3x64x64) with a random eta table, builds its TensorRT engine with batch sizes
1,B,B, then times every backend on the same inputs in one process:

* ``tensorrt`` and ``tensorrt-cuda-graph``: ``model.plan`` through the TensorRT backend, the
  second replaying one CUDA graph per evaluation at batch B;
* ``onnxruntime-cuda``: ``model.onnx`` on ONNX Runtime's CUDA provider with IO binding, TF32 off;
* ``pytorch-eager-cuda``: the network in eager PyTorch on the GPU, minus eta gathered on the GPU.

For each backend it reports the median time of one evaluation at batch B and the images per
second of a whole sampling run (multistep DPM-Solver order 2), plus the max abs difference of one
evaluation from PyTorch eager. Results are rewritten after every stage, so a run stopped by a
time limit keeps what it measured. ``--dry-run`` runs the parts that need no GPU (model, export,
fold, manifest) and times ONNX Runtime and PyTorch on the CPU instead.

    .venv/bin/python benchmarks/gpu_benchmark.py --out gpu-results/benchmark.json
    .venv/bin/python benchmarks/gpu_benchmark.py --dry-run --architecture tiny --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench_common import model_spec, write_inputs

logger = logging.getLogger("gpu_benchmark")

ARCHITECTURES = ("celeba64", "tiny")
METHOD, ORDER = "multistep", 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-results/benchmark.json"),
                        help="Results file (JSON).")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="celeba64",
                        help="celeba64 (the DDIM CelebA 64x64 UNet) or tiny (a 1x8x8 UNet).")
    parser.add_argument("--batch-size", type=int, default=16, help="Batch size B.")
    parser.add_argument("--num-samples", type=int, default=64, help="Images per sampling run.")
    parser.add_argument("--steps", type=int, default=10, help="Network evaluations per sample.")
    parser.add_argument("--repeats", type=int, default=20, help="Timed single evaluations.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of weights, eta and noise.")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="Keep the model and artifact here (default: a temporary folder).")
    parser.add_argument("--dry-run", action="store_true",
                        help="Skip everything that needs a GPU; time the CPU backends instead.")
    args = parser.parse_args(argv)
    for name in ("batch_size", "num_samples", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


class TorchEagerBackend:
    """The network in eager PyTorch on ``device``, minus eta gathered and blended on the device.

    eta uses the interpolation rule of ``calibexport.runtime.eta_table.neighbour_rows``.
    """

    def __init__(self, module: Any, eta: np.ndarray, device: str, name: str) -> None:
        import torch

        self.torch = torch
        self.name = name
        self.device = device
        self.module = module.eval().to(device)
        self.table = torch.from_numpy(eta).to(device)
        self.image_shape = tuple(eta.shape[1:])
        self.timestep_dtype = np.dtype(np.float32)

    def eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        from calibexport.runtime.eta_table import neighbour_rows

        torch = self.torch
        lower, upper, weight = neighbour_rows(np.asarray(timestep, np.float64), len(self.table))
        with torch.inference_mode():
            x_device = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)
            t_device = torch.from_numpy(np.asarray(timestep, np.float32)).to(self.device)
            low = self.table[torch.from_numpy(lower).to(self.device)]
            high = self.table[torch.from_numpy(upper).to(self.device)]
            w = torch.from_numpy(weight).to(self.device).reshape(-1, 1, 1, 1)
            eps = self.module(x_device, t_device) - (low + w * (high - low))
            return eps.float().cpu().numpy()

    def close(self) -> None:
        self.module = self.table = None


def time_backend(backend: Any, schedule: Any, args: argparse.Namespace,
                 reference_eps: np.ndarray | None) -> tuple[dict[str, Any], np.ndarray]:
    """Time single evaluations and one sampling run; return the timings and one eps output."""
    from calibexport.runtime.noise import initial_noise
    from calibexport.runtime.sampler import Sampler

    batch = args.batch_size
    x = initial_noise(args.seed, np.arange(batch), tuple(backend.image_shape))
    timestep = np.linspace(0, 999, batch).round()
    for _ in range(3):
        eps = backend.eps(x, timestep)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        backend.eps(x, timestep)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)

    sampler = Sampler(backend, schedule)
    start = time.perf_counter()
    images = sampler.sample(args.num_samples, steps=args.steps, order=ORDER, method=METHOD,
                            seed=args.seed, batch_size=batch)
    seconds = time.perf_counter() - start
    result = {
        "eval_ms_median": round(median * 1e3, 3),
        "eval_ms_min": round(min(times) * 1e3, 3),
        "eval_images_per_second": round(batch / median, 1),
        "sampling_seconds": round(seconds, 3),
        "sampling_images_per_second": round(args.num_samples / seconds, 2),
        "samples_finite": bool(np.all(np.isfinite(images))),
    }
    if reference_eps is not None:
        result["max_abs_diff_vs_pytorch"] = float(np.abs(eps - reference_eps).max())
    return result, eps


def gpu_backends(artifact: Path, batch: int) -> list[tuple[str, Callable[[], Any]]]:
    from calibexport.runtime.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend
    from calibexport.runtime.backends.tensorrt import TensorRTBackend

    return [
        ("tensorrt", lambda: TensorRTBackend.from_artifact(artifact)),
        ("tensorrt-cuda-graph",
         lambda: TensorRTBackend.from_artifact(artifact, cuda_graph_batch=batch)),
        ("onnxruntime-cuda", lambda: OnnxRuntimeCudaBackend(artifact / "model.onnx")),
    ]


def host_facts(dry_run: bool) -> dict[str, Any]:
    import onnxruntime
    import torch

    facts = {"python": platform.python_version(), "platform": platform.platform(),
             "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
             "onnxruntime_providers": onnxruntime.get_available_providers()}
    if not dry_run:
        try:
            import tensorrt

            facts["tensorrt"] = tensorrt.__version__
        except ImportError as error:
            facts["tensorrt"] = f"not available: {error}"
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
            facts["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
    return facts


def run(args: argparse.Namespace, work_dir: Path, results: dict[str, Any],
        save: Callable[[], None]) -> None:
    import torch

    from calibexport.exporter.build import BuildOptions, build_artifact
    from calibexport.exporter.engine_cache import BatchProfile
    from calibexport.exporter.tensorrt_engine import EngineBuildOptions, build_artifact_engine
    from calibexport.models.loaders import load_model
    from calibexport.runtime.artifact import load_manifest
    from calibexport.runtime.eta_table import load_eta_table
    from calibexport.runtime.schedule import schedule_from_spec

    # Build the ONNX artifact, then the engine on its own so its build time is measured alone.
    start = time.perf_counter()
    model_path, eta_path = write_inputs(work_dir, args.architecture, args.seed)
    artifact = work_dir / "artifact"
    build_artifact(BuildOptions(model=model_path, eta=eta_path, out=artifact,
                                exporter="torchscript", validate=False, engine=False))
    results["build"] = {"onnx_seconds": round(time.perf_counter() - start, 1),
                        "onnx_bytes": (artifact / "model.onnx").stat().st_size}
    if not args.dry_run:
        profile = BatchProfile(1, args.batch_size, args.batch_size)
        metadata = build_artifact_engine(artifact, EngineBuildOptions(profile=profile))
        results["build"].update(engine_seconds=round(metadata.build_seconds, 1),
                                plan_bytes=metadata.plan_bytes, engine=metadata.to_dict())
    save()

    # Time PyTorch eager first: it is the reference of every difference.
    schedule = schedule_from_spec(load_manifest(artifact).schedule)
    eta = load_eta_table(artifact / "eta.npy").values
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        # A dry run checks the code paths; one thread avoids stalls on a shared, loaded CPU.
        torch.set_num_threads(1)
    module = load_model(model_path).module
    torch.set_grad_enabled(False)
    reference = TorchEagerBackend(module, eta, device, f"pytorch-eager-{device}")
    results["backends"][reference.name], reference_eps = time_backend(reference, schedule, args,
                                                                      None)
    reference.close()
    save()

    if args.dry_run:
        from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend

        contenders = [("onnxruntime-cpu", lambda: OnnxRuntimeBackend(artifact / "model.onnx"))]
        for name, _ in gpu_backends(artifact, args.batch_size):
            results["backends"][name] = {"skipped": "--dry-run"}
    else:
        contenders = gpu_backends(artifact, args.batch_size)
    for name, open_backend in contenders:
        logger.info("Timing %s ...", name)
        try:
            with open_backend() as backend:
                results["backends"][name], _ = time_backend(backend, schedule, args,
                                                            reference_eps)
        except Exception as error:  # one failing backend must not hide the others' numbers
            logger.exception("%s failed", name)
            results["backends"][name] = {"failed": f"{type(error).__name__}: {error}"}
        save()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    results: dict[str, Any] = {
        "status": "running",
        "config": {key: str(value) if isinstance(value, Path) else value
                   for key, value in vars(args).items()},
        "sampling": {"method": METHOD, "order": ORDER},
        "host": host_facts(args.dry_run),
        "backends": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    logger.info("Configuration: %s", json.dumps(results["config"]))
    save()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-benchmark-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            run(args, work_dir, results, save)
            results["status"] = "complete"
        except Exception as error:
            logger.exception("The benchmark failed")
            results["status"] = f"failed: {type(error).__name__}: {error}"
    results["seconds"] = round(time.perf_counter() - start, 1)
    save()
    logger.info("Wrote %s (%s) in %.0fs.", args.out, results["status"], results["seconds"])
    return 0 if results["status"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
