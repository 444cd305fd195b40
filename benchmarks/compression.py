"""Measure compressed eta tables on the digits demo model: errors, sizes and interpolation.

Four measurements, printed as Markdown tables and saved as JSON:

1. Knot and low-rank forms of a dense table (``--table``, the demo's ``eta.npy``): maximum and
   mean absolute error against that table, bytes stored, and bytes of a folded ONNX graph.
2. The same forms against a reference estimated with many more samples at a few rows, next to
   the dense table's own error there. The dense table misses the true eta by its Monte Carlo
   standard error, so a compressed table is judged against the reference, not the table.
3. Interpolation at non-integer model times: eta estimated directly at k + 0.5 against the
   linear interpolation of rows k and k + 1, with common random numbers
   (``interpolation_bias``), compared with the table's standard error at row k.
4. The published-linear schedule below its model-time shift: eta at t_end = 1e-4, where the
   model input time is 0, against row 0 (t = 1e-3).

Example (the demo table from ``scripts/demo.sh``)::

    .venv/bin/python benchmarks/compression.py --table demo-output/eta.npy \\
        --out /tmp/compression.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from calibexport.calibration_tables.compress import (
    compress_knots,
    compress_lowrank,
    compression_summary,
    estimate_eta_at,
    interpolation_bias,
)
from calibexport.runtime.eta_table import EtaTable, KnotEta, LowRankEta, load_eta_table

logger = logging.getLogger("benchmarks.compression")

KNOT_COUNTS = (16, 32, 64, 128, 256)
RANKS = (1, 2, 4, 8, 16, 32)
REFERENCE_ROWS = (0, 5, 20, 50, 100, 250, 500, 900)
BETWEEN_TIMES = (0.5, 5.5, 20.5, 100.5, 500.5, 900.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=Path("demo-output/eta.npy"))
    parser.add_argument("--model", type=Path, default=Path("examples/digits/digits.safetensors"))
    parser.add_argument("--reference-samples", type=int, default=512)
    parser.add_argument("--between-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    torch.set_num_threads(args.threads)
    table = load_eta_table(args.table)
    forms = _forms(table.values)
    results: dict[str, Any] = {"table": str(args.table), "torch_threads": args.threads,
                               "table_num_samples": (table.metadata or {}).get("num_samples")}
    results["sizes"] = [_size_row(table, form) for form in forms]
    _print_sizes(results["sizes"], table)

    loaded, images, schedule = _load(args.model)
    recorded = (table.metadata or {}).get("model_weights_sha256")
    if recorded != loaded.weights_sha256:
        logger.warning("%s was estimated for weights %s, not %s's %s.", args.table, recorded,
                       args.model, loaded.weights_sha256)
    start = time.perf_counter()
    results["reference"] = _reference(table, forms, loaded, images, schedule,
                                      args.reference_samples)
    results["interpolation"] = _interpolation(table, loaded, images, schedule,
                                              args.between_samples)
    results["published_linear_t_end"] = _t_end(loaded, images, args.reference_samples)
    results["network_seconds"] = time.perf_counter() - start
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("Wrote %s.", args.out)


def _forms(values: np.ndarray) -> list[KnotEta | LowRankEta]:
    forms: list[KnotEta | LowRankEta] = [compress_knots(values, num_knots=count)
                                         for count in KNOT_COUNTS]
    forms += [compress_lowrank(values, rank=rank) for rank in RANKS]
    return forms


def _label(form: KnotEta | LowRankEta) -> str:
    if isinstance(form, KnotEta):
        return f"knots K={len(form.knots)}"
    return f"lowrank R={form.rank}"


def _size_row(table: EtaTable, form: KnotEta | LowRankEta) -> dict[str, Any]:
    summary = compression_summary(table.values, form)
    summary.pop("row_max_abs_error")
    summary.pop("knots", None)
    summary["label"] = _label(form)
    summary["folded_bytes"], summary["dense_folded_bytes"] = _folded_bytes(table, form)
    return summary


def _folded_bytes(table: EtaTable, form: KnotEta | LowRankEta) -> tuple[int, int]:
    """Serialized size of eps = x folded with ``form`` and with the dense table."""
    import onnx
    from onnx import TensorProto, helper

    from calibexport.exporter.fold import fold_eta
    from calibexport.exporter.fold_compressed import fold_compressed_eta

    shape = ["batch", *table.image_shape]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["eps"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, shape)])
    network = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    compressed = fold_compressed_eta(onnx.ModelProto.FromString(network.SerializeToString()),
                                     form, timestep_input="t")
    dense = fold_eta(network, table.values, timestep_input="t")
    return compressed.ByteSize(), dense.ByteSize()


def _print_sizes(rows: list[dict[str, Any]], table: EtaTable) -> None:
    print(f"\nForms of {table.path} {list(table.values.shape)} against the dense table\n")
    print("| form | max abs error | mean abs error | stored bytes | share | folded graph bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['label']} | {row['max_abs_error']:.4f} | {row['mean_abs_error']:.5f} | "
              f"{row['compressed_bytes']} | {100 * row['bytes_ratio']:.1f}% | "
              f"{row['folded_bytes']} (dense {row['dense_folded_bytes']}) |")


def _load(model_path: Path) -> tuple[Any, np.ndarray, Any]:
    from calibexport.calibration_tables.data import load_data
    from calibexport.models.loaders import load_model
    from calibexport.runtime.schedule import schedule_from_spec

    loaded = load_model(model_path)
    channels, resolution, _ = loaded.spec.image_shape
    images = load_data("digits", channels=channels, resolution=resolution)
    return loaded, images, schedule_from_spec(loaded.spec.schedule)


def _reference(table: EtaTable, forms: list, loaded: Any, images: np.ndarray, schedule: Any,
               num_samples: int) -> dict[str, Any]:
    """Errors against a many-sample estimate at REFERENCE_ROWS (seed 1, independent of seed 0)."""
    rows = np.array(REFERENCE_ROWS)
    reference = estimate_eta_at(loaded.module, schedule, images, schedule.timestep_to_t(rows),
                                num_samples=num_samples, seed=1)
    truth = reference.eta.astype(np.float64)
    result: dict[str, Any] = {"rows": rows.tolist(), "num_samples": num_samples,
                              "reference_se_mean": float(reference.standard_error.mean())}
    candidates = [("dense table", table.values[rows])] + [
        (_label(form), form.dense()[rows]) for form in forms]
    print(f"\nAgainst a {num_samples}-sample reference at rows {rows.tolist()} "
          f"(reference SE mean {result['reference_se_mean']:.4f})\n")
    print("| table | RMS error | max abs error |")
    print("|---|---:|---:|")
    result["errors"] = []
    for label, values in candidates:
        difference = values.astype(np.float64) - truth
        entry = {"label": label, "rms_error": float(np.sqrt(np.mean(difference**2))),
                 "max_abs_error": float(np.abs(difference).max())}
        result["errors"].append(entry)
        print(f"| {label} | {entry['rms_error']:.4f} | {entry['max_abs_error']:.4f} |")
    return result


def _interpolation(table: EtaTable, loaded: Any, images: np.ndarray, schedule: Any,
                   num_samples: int) -> list[dict[str, Any]]:
    times = np.array(BETWEEN_TIMES)
    bias, direct = interpolation_bias(loaded.module, schedule, images, times,
                                      num_samples=num_samples)
    se = _table_standard_error(table)
    print(f"\nInterpolation at k + 0.5 against a direct estimate ({num_samples} common samples)\n")
    print("| model time | max abs bias | mean abs bias | table SE at k (mean, max) | "
          "direct SE mean |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    for index, time_value in enumerate(times):
        lower = int(np.floor(time_value))
        entry = {"timestep": float(time_value), "max_abs_bias": float(np.abs(bias[index]).max()),
                 "mean_abs_bias": float(np.abs(bias[index]).mean()),
                 "table_se_mean": float(se[lower, 0]), "table_se_max": float(se[lower, 1]),
                 "direct_se_mean": float(direct.standard_error[index].mean())}
        rows.append(entry)
        print(f"| {time_value} | {entry['max_abs_bias']:.4f} | {entry['mean_abs_bias']:.5f} | "
              f"{entry['table_se_mean']:.4f}, {entry['table_se_max']:.4f} | "
              f"{entry['direct_se_mean']:.4f} |")
    return rows


def _table_standard_error(table: EtaTable) -> np.ndarray:
    """Return the per-pixel SE mean and max of every row from the sidecar, as [T, 2]."""
    summary = (table.metadata or {}).get("standard_error") or {}
    means = np.asarray(summary.get("row_mean", [np.nan] * table.num_timesteps))
    maxima = np.asarray(summary.get("row_max", [np.nan] * table.num_timesteps))
    return np.stack([means, maxima], axis=1)


def _t_end(loaded: Any, images: np.ndarray, num_samples: int) -> dict[str, Any]:
    """eta at t = 1e-4 against t = 1e-3 on the published-linear schedule (model time 0 both)."""
    from calibexport.models.presets import resolve_schedule
    from calibexport.runtime.schedule import schedule_from_spec

    schedule = schedule_from_spec(resolve_schedule("published-linear"))
    estimate = estimate_eta_at(loaded.module, schedule, images, np.array([1e-4, 1e-3]),
                               num_samples=num_samples)
    difference = estimate.eta[0].astype(np.float64) - estimate.eta[1]
    result = {"num_samples": num_samples, "max_abs_difference": float(np.abs(difference).max()),
              "mean_abs_difference": float(np.abs(difference).mean()),
              "rms_eta_row0": float(np.sqrt(np.mean(estimate.eta[1].astype(np.float64) ** 2))),
              "se_mean": float(estimate.standard_error.mean())}
    print(f"\npublished-linear: eta(t=1e-4) - eta(t=1e-3), both at model time 0: max "
          f"{result['max_abs_difference']:.4f}, mean {result['mean_abs_difference']:.4f} "
          f"(RMS of eta there {result['rms_eta_row0']:.4f}, SE mean {result['se_mean']:.4f})")
    return result


if __name__ == "__main__":
    main()
