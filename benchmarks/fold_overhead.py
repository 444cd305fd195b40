"""Latency of the calibrated ONNX graph against the uncalibrated one, in ONNX Runtime on the CPU.

Both graphs come from one export of the same network, optimized the same way
(``calibexport.exporter.optimize``). The calibrated one adds the eta fold for float timesteps,
which is the interpolating lookup, the more expensive of the two. Each repeat times one evaluation of each
graph at the same inputs, in alternating order (ABBA), after warm-up runs. The report gives the
median time of each graph, the overhead median(calibrated) / median(uncalibrated) - 1, and the
median of the per-repeat ratios.

    .venv/bin/python benchmarks/fold_overhead.py --model examples/digits/digits.safetensors \\
        --batch 8 --repeats 200 --out benchmarks/results/fold_overhead_digits.json
    .venv/bin/python benchmarks/fold_overhead.py --architecture celeba64 --batch 4 --repeats 30 \\
        --out benchmarks/results/fold_overhead_celeba64.json

``--architecture`` builds that preset with random weights instead of loading ``--model``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def build_graphs(args: argparse.Namespace) -> tuple[Any, Any, tuple[int, int, int], str]:
    """Return (uncalibrated, calibrated) ONNX models, the image shape and the source name."""
    import onnx
    import torch

    from calibexport.exporter.fold import fold_eta
    from calibexport.exporter.onnx_export import export_onnx
    from calibexport.exporter.optimize import optimize_graph
    from calibexport.models import DDPMUNet, get_preset, load_model

    torch.set_num_threads(max(1, args.threads))
    if args.architecture:
        torch.manual_seed(0)
        spec = get_preset(args.architecture)
        module, source = DDPMUNet(spec.unet).eval(), f"{args.architecture} (random weights)"
    else:
        loaded = load_model(args.model)
        spec, module, source = loaded.spec, loaded.module, str(args.model)
    image_shape = spec.image_shape
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "network.onnx"
        export_onnx(module, path, image_shape=image_shape, exporter=args.exporter)
        network = optimize_graph(onnx.load(str(path)))
    rows = int(spec.schedule.get("num_timesteps", 1000))
    eta = np.random.default_rng(0).normal(size=(rows, *image_shape)).astype(np.float32) * 0.01
    return network, fold_eta(network, eta), image_shape, source


def time_graphs(base: Any, folded: Any, image_shape: tuple[int, int, int],
                args: argparse.Namespace) -> dict[str, Any]:
    """Time both graphs in alternating order; return the per-repeat seconds of each."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    sessions = {name: ort.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
                for name, model in (("uncalibrated", base), ("calibrated", folded))}
    rng = np.random.default_rng(1)
    feeds = {"x": rng.normal(size=(args.batch, *image_shape)).astype(np.float32),
             "t": rng.uniform(0, 999, size=args.batch).astype(np.float32)}
    for _ in range(args.warmup):
        for session in sessions.values():
            session.run(None, feeds)

    seconds: dict[str, list[float]] = {name: [] for name in sessions}
    for repeat in range(args.repeats):
        order = list(sessions) if repeat % 2 == 0 else list(reversed(sessions))
        for name in order:
            start = time.perf_counter()
            sessions[name].run(None, feeds)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def identity_graphs(image_shape: tuple[int, int, int], rows: int) -> tuple[Any, Any]:
    """Return (eps = x, eps = x - eta(t)): the fold's own cost without a network around it."""
    import onnx
    from onnx import TensorProto, helper

    from calibexport.exporter.fold import fold_eta

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["eps"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *image_shape]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", *image_shape])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    eta = np.random.default_rng(0).normal(size=(rows, *image_shape)).astype(np.float32)
    return model, fold_eta(model, eta)


def summarize(seconds: dict[str, list[float]]) -> dict[str, Any]:
    base, folded = seconds["uncalibrated"], seconds["calibrated"]
    ratios = [f / b for f, b in zip(folded, base)]
    return {
        "median_ms": {name: 1e3 * statistics.median(values) for name, values in seconds.items()},
        "overhead_of_medians": statistics.median(folded) / statistics.median(base) - 1.0,
        "median_of_paired_ratios": statistics.median(ratios) - 1.0,
        "paired_ratio_quartiles": [q - 1.0 for q in statistics.quantiles(ratios, n=4)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="checkpoint to load (calibexport formats)")
    source.add_argument("--architecture", help="a preset built with random weights (celeba64)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args()

    base, folded, image_shape, name = build_graphs(args)
    seconds = time_graphs(base, folded, image_shape, args)
    from calibexport.exporter.fold import PREFIX

    rows = next(t.dims[0] for t in folded.graph.initializer if t.name == PREFIX + "table")
    alone = time_graphs(*identity_graphs(image_shape, rows), image_shape, args)
    fold_ms = 1e3 * (statistics.median(alone["calibrated"])
                     - statistics.median(alone["uncalibrated"]))
    import onnxruntime

    report = {
        "source": name,
        "image_shape": list(image_shape),
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": args.threads,
        "exporter": args.exporter,
        "nodes": {"uncalibrated": len(base.graph.node), "calibrated": len(folded.graph.node)},
        **summarize(seconds),
        # The fold's own cost, measured on an identity network, as a share of the network's time.
        "fold_alone_ms": fold_ms,
        "fold_alone_fraction": fold_ms / (1e3 * statistics.median(seconds["uncalibrated"])),
        "host": {"machine": platform.machine(), "processor_count": os.cpu_count(),
                 "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
