"""Network evaluations each eta estimator needs for the whole table to reach one standard error.

The target is the largest per-row RMS standard error (sqrt of the mean over pixels of the
squared per-pixel standard error) at or below ``--target``. Each estimator allocates samples
across rows as well as it can: row k gets n_k = var_k / target^2 terms, where var_k is the
pixel-mean variance of one term measured in a pilot run, so its whole-table cost is sum_k n_k
evaluations (twice the terms for antithetic pairs). Uniform allocation (every row as many
samples as the worst row needs) is listed for comparison.

What is measured and what is computed:

1. Pilot: on every ``--row-step``-th row and the last row, ``--pilot`` evaluations with the
   regression estimator (whose sums also give the naive, control-variate and per-pixel
   regression terms of the same draws) and ``--pilot`` evaluations of antithetic pairs. The
   whole-table counts are computed from these variances, interpolated linearly to every row.
2. Verification: the best estimator runs to the target on ``--verify-rows`` with its allocated
   counts, twice with independent seeds. The report gives the standard error it reports per row
   and the RMS difference between the two runs divided by sqrt(2), a direct measurement of the
   error that does not trust the reported one.
3. Common random numbers: on the same draws (x0, e), the per-pixel variance of the difference
   of control-variate terms between rows k and k + 1, against the sum of the two variances that
   independent draws give. CRN leaves each row's own variance, and so the target above, as is.

Run from the repository root:

    .venv/bin/python benchmarks/estimators.py --out benchmarks/results/estimators.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from calibexport.calibration_tables.allocation import allocate_samples, rms_standard_error
from calibexport.calibration_tables.data import load_data
from calibexport.calibration_tables.estimate import (
    RowSums,
    accumulate_row_sums,
    derive_row_sums,
    evaluations_per_term,
    row_moments,
    table_coefficients,
)
from calibexport.models.loaders import load_model
from calibexport.runtime.schedule import schedule_from_spec

DERIVED = ("naive", "control_variate", "regression", "regression_pixel")
ESTIMATOR_ORDER = (*DERIVED, "antithetic")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="examples/digits/digits.safetensors")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--target", type=float, default=0.01,
                        help="largest per-row RMS standard error to reach")
    parser.add_argument("--row-step", type=int, default=10, help="pilot every N-th row")
    parser.add_argument("--pilot", type=int, default=128, help="pilot evaluations per row")
    parser.add_argument("--verify-rows", default="0,100,500,999")
    parser.add_argument("--crn-rows", default="0,100,500,900")
    parser.add_argument("--crn-samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args()


def term_variance(sums: RowSums, rows: np.ndarray) -> np.ndarray:
    """Pixel-mean variance of one term on ``rows``."""
    variance = row_moments(sums).variance[rows]
    return variance.reshape(len(rows), -1).mean(axis=1)


def pilot(model, data, alpha, sigma, rows, args) -> tuple[dict, dict]:
    """Measure the per-term variance of every estimator on the pilot rows."""
    ranges = np.zeros((len(alpha), 2), dtype=np.int64)
    ranges[rows, 1] = args.pilot
    variances, seconds = {}, {}
    for estimator in ("regression", "antithetic"):
        start = time.perf_counter()
        sums = accumulate_row_sums(model, data, alpha, sigma, ranges, estimator=estimator,
                                   batch_size=args.batch_size, seed=args.seed, progress=True)
        sums.counts[sums.counts == 0] = args.pilot  # rows outside the pilot are never read
        seconds[estimator] = time.perf_counter() - start
        derived = DERIVED if estimator == "regression" else ("antithetic",)
        for name in derived:
            source = sums if name == "antithetic" else derive_row_sums(sums, name)
            variances[name] = term_variance(source, rows)
    return variances, seconds


def counts_table(variances: dict, rows: np.ndarray, num_rows: int, args) -> dict:
    """Whole-table evaluations per estimator, allocated and uniform."""
    table = {}
    for name in ESTIMATOR_ORDER:
        # Interpolate the pilot variances to every row, then allocate row by row.
        every_row = np.interp(np.arange(num_rows), rows, variances[name])
        per_row = allocate_samples(every_row, args.target, estimator=name)
        table[name] = {
            "mean_variance_per_evaluation": float(
                (every_row * evaluations_per_term(name)).mean()),
            "allocated_evaluations": int(per_row.sum()),
            "uniform_evaluations": int(per_row.max()) * num_rows,
            "pilot_rows": [int(row) for row in rows],
            "pilot_term_variance": [float(value) for value in variances[name]],
            "row_evaluations": [int(count) for count in per_row],
        }
    naive = table["naive"]["allocated_evaluations"]
    for entry in table.values():
        entry["speedup_vs_naive"] = naive / entry["allocated_evaluations"]
    return table


def verify(model, data, alpha, sigma, rows, best, counts, args) -> dict:
    """Run ``best`` to the target on ``rows`` twice and compare the two tables."""
    ranges = np.zeros((len(alpha), 2), dtype=np.int64)
    ranges[rows, 1] = counts
    runs, start = [], time.perf_counter()
    for seed in (args.seed + 1, args.seed + 2):
        sums = accumulate_row_sums(model, data, alpha, sigma, ranges, estimator=best,
                                   batch_size=args.batch_size, seed=seed, progress=True)
        sums.counts[sums.counts == 0] = 1000  # rows outside the check are never read
        runs.append(row_moments(sums))
    seconds = time.perf_counter() - start
    reported = [rms_standard_error(run.standard_error[rows]) for run in runs]
    difference = (runs[0].mean[rows] - runs[1].mean[rows]).reshape(len(rows), -1)
    measured = np.sqrt((difference**2).mean(axis=1) / 2)
    return {
        "estimator": best,
        "rows": [int(row) for row in rows],
        "evaluations_per_run": [int(count) for count in counts],
        "reported_rms_se": [[float(value) for value in run] for run in reported],
        "replicate_rms_error": [float(value) for value in measured],
        "seconds": seconds,
    }


def common_noise_effect(model, data, alpha, sigma, rows, args) -> list[dict]:
    """Variance of the row-to-row difference of control-variate terms on the same draws."""
    generator = torch.Generator().manual_seed(args.seed + 3)
    images = torch.from_numpy(data)
    results = []
    for row in rows:
        index = torch.randint(0, len(images), (args.crn_samples,), generator=generator)
        noise = torch.randn((args.crn_samples, *images.shape[1:]), generator=generator)
        terms = []
        for k in (row, row + 1):
            x_t = float(alpha[k]) * images[index] + float(sigma[k]) * noise
            with torch.inference_mode():
                eps = model(x_t, torch.full((len(x_t),), float(k)))
            terms.append((eps - noise).double())
        same = (terms[0] - terms[1]).var(dim=0).mean().item()
        independent = (terms[0].var(dim=0) + terms[1].var(dim=0)).mean().item()
        results.append({"rows": [int(row), int(row) + 1], "difference_variance_same_draws": same,
                        "difference_variance_independent_draws": independent,
                        "ratio": independent / same})
    return results


def report(results: dict) -> str:
    """Markdown tables of the results."""
    lines = [
        f"target: largest per-row RMS standard error <= {results['target']}",
        "",
        "| estimator | variance per evaluation (pixel mean, table mean) | evaluations, "
        "allocated | evaluations, uniform | naive / this (allocated) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, entry in results["counts"].items():
        lines.append(
            f"| {name} | {entry['mean_variance_per_evaluation']:.4g} | "
            f"{entry['allocated_evaluations']:,} | {entry['uniform_evaluations']:,} | "
            f"{entry['speedup_vs_naive']:.1f}x |"
        )
    lines += ["", f"estimator speed-up: {results['speedup']:.1f}x ({results['best']})", ""]
    check = results["verification"]
    lines += ["| row | evaluations | reported RMS SE (run 1, run 2) | replicate RMS error |",
              "|---:|---:|---:|---:|"]
    for i, row in enumerate(check["rows"]):
        lines.append(
            f"| {row} | {check['evaluations_per_run'][i]} | "
            f"{check['reported_rms_se'][0][i]:.4f}, {check['reported_rms_se'][1][i]:.4f} | "
            f"{check['replicate_rms_error'][i]:.4f} |"
        )
    lines += ["", "| rows | difference variance, same draws | independent draws | ratio |",
              "|---|---:|---:|---:|"]
    for entry in results["common_noise"]:
        lines.append(
            f"| {entry['rows'][0]}, {entry['rows'][1]} | "
            f"{entry['difference_variance_same_draws']:.4g} | "
            f"{entry['difference_variance_independent_draws']:.4g} | {entry['ratio']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_arguments()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model = loaded.module
    unet = loaded.spec.unet
    data = load_data(args.data, channels=unet.in_channels, resolution=unet.resolution)
    alpha, sigma = table_coefficients(schedule_from_spec(loaded.spec.schedule))
    rows = np.unique(np.append(np.arange(0, len(alpha), args.row_step), len(alpha) - 1))
    verify_rows = np.array([int(row) for row in args.verify_rows.split(",")])
    crn_rows = [int(row) for row in args.crn_rows.split(",")]
    last = len(alpha) - 1
    if verify_rows.min() < 0 or verify_rows.max() > last or max(crn_rows) >= last:
        sys.exit(f"--verify-rows must lie in 0..{len(alpha) - 1} and --crn-rows in "
                 f"0..{len(alpha) - 2}")

    started = time.perf_counter()
    variances, pilot_seconds = pilot(model, data, alpha, sigma, rows, args)
    counts = counts_table(variances, rows, len(alpha), args)
    best = min(counts, key=lambda name: counts[name]["allocated_evaluations"])

    verify_counts = np.array(counts[best]["row_evaluations"])[verify_rows]
    results = {
        "model": args.model,
        "data": args.data,
        "target": args.target,
        "row_step": args.row_step,
        "pilot_evaluations_per_row": args.pilot,
        "seed": args.seed,
        "counts": counts,
        "best": best,
        "speedup": counts["naive"]["allocated_evaluations"] / counts[best]["allocated_evaluations"],
        "pilot_seconds": pilot_seconds,
        "verification": verify(model, data, alpha, sigma, verify_rows, best, verify_counts, args),
        "common_noise": common_noise_effect(model, data, alpha, sigma, crn_rows, args),
        "seconds": time.perf_counter() - started,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown CPU'}",
    }
    print(report(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
