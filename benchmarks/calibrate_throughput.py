"""Calibration throughput (network evaluations per second) and peak memory, against bare forwards.

For each case, runs as separate processes (so each peak resident memory is its own):

* ``calibrate``: ``calibexport calibrate`` with the case's estimator, sample count and batch size.
  Its evaluations per second are the count it reports divided by its own estimation time.
* ``bare-forward``: the same network evaluated the same number of times at the same batch size
  on random inputs in a plain ``torch.inference_mode`` loop, which is the floor any estimator
  built on this network can reach.

Cases: the bundled digits model over the whole table with three estimators, and the celeba64
architecture (random weights, random uint8 images) over one shard of its rows at two batch sizes.
Both processes of a case use the same torch thread count (torch's default, one per core).

    .venv/bin/python benchmarks/calibrate_throughput.py \\
        --out benchmarks/results/calibrate_throughput.json
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench_common import CALIBEXPORT, machine_facts, run_measured, write_inputs, write_record

BARE_FORWARD = """
import sys, time, torch
from calibexport.models.loaders import load_model
module = load_model(sys.argv[1]).module.eval()
total, batch = int(sys.argv[2]), int(sys.argv[3])
shape = tuple(int(d) for d in sys.argv[4].split(","))
generator = torch.Generator().manual_seed(0)
done, start = 0, time.perf_counter()
with torch.inference_mode():
    while done < total:
        n = min(batch, total - done)
        x = torch.randn((n, *shape), generator=generator)
        t = torch.randint(0, 1000, (n,), generator=generator).to(torch.float32)
        module(x, t)
        done += n
seconds = time.perf_counter() - start
print(f"bare forward: {done} evaluations in {seconds:.2f}s ({done / seconds:.1f} evaluations/s)")
"""

# The whole-table summary line, or the shard summary line.
CALIBRATE_RATE = (r"Estimated eta in ([0-9.]+)s: ([0-9]+) evaluations|"
                  r"\(([0-9]+) evaluations in ([0-9.]+)s, [0-9.]+ evaluations/s\)")
BARE_RATE = r"bare forward: ([0-9]+) evaluations in ([0-9.]+)s"


def cases(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    digits = Path(__file__).resolve().parents[1] / "examples/digits/digits.safetensors"
    found = [{"name": f"digits {estimator}", "model": digits, "data": "digits",
              "shape": "1,16,16", "rows": 1000, "estimator": estimator,
              "num_samples": args.digits_samples, "batch": 256, "shard": None}
             for estimator in args.estimators.split(",")]
    if args.celeba64:
        model, _ = write_inputs(work, "celeba64", seed=0)
        images = np.random.default_rng(0).integers(0, 256, (64, 64, 64, 3), dtype=np.uint8)
        np.save(work / "images.npy", images)
        rows = 1000 // args.celeba64_shards
        found += [{"name": f"celeba64 batch {batch}", "model": model,
                   "data": str(work / "images.npy"), "shape": "3,64,64", "rows": rows,
                   "estimator": "control_variate", "num_samples": args.celeba64_samples,
                   "batch": batch, "shard": f"1/{args.celeba64_shards}"}
                  for batch in (16, 64)]
    return found


def run_calibrate(case: dict[str, Any], work: Path) -> tuple[dict[str, Any], float, int]:
    """Run `calibexport calibrate` for ``case``; return the run, its seconds and evaluations."""
    out = work / "eta.npy" if case["shard"] is None else work / "eta.npz"
    command = [str(CALIBEXPORT), "calibrate", "--model", str(case["model"]), "--data",
               case["data"], "--out", str(out), "--estimator", case["estimator"],
               "--num-samples", str(case["num_samples"]), "--batch-size", str(case["batch"])]
    if case["shard"]:
        command += ["--shard", case["shard"]]
    calibrate = run_measured(command)
    match = re.search(CALIBRATE_RATE, calibrate["output"])
    if calibrate["returncode"] != 0 or not match:
        raise SystemExit(f"calibrate failed:\n{calibrate['output'][-3000:]}")

    if match.group(1) is not None:
        return calibrate, float(match.group(1)), int(match.group(2))
    return calibrate, float(match.group(4)), int(match.group(3))


def run_bare(case: dict[str, Any], evaluations: int) -> tuple[dict[str, Any], float]:
    """Run the bare forward loop for ``case``; return the run and its evaluations per second."""
    bare = run_measured([sys.executable, "-c", BARE_FORWARD, str(case["model"]),
                         str(evaluations), str(case["batch"]), case["shape"]])
    match = re.search(BARE_RATE, bare["output"])
    if bare["returncode"] != 0 or not match:
        raise SystemExit(f"bare forward failed:\n{bare['output'][-3000:]}")
    return bare, int(match.group(1)) / float(match.group(2))


def measure(case: dict[str, Any], work: Path) -> dict[str, Any]:
    calibrate, estimate_seconds, evaluations = run_calibrate(case, work)
    bare, bare_rate = run_bare(case, evaluations)
    rate = evaluations / estimate_seconds
    return {
        **{k: str(v) for k, v in case.items()}, "evaluations": evaluations,
        "calibrate_evaluations_per_second": rate,
        "calibrate_process_seconds": calibrate["seconds"],
        "calibrate_peak_rss_mib": calibrate["peak_rss_mib"],
        "bare_evaluations_per_second": bare_rate,
        "bare_process_seconds": bare["seconds"], "bare_peak_rss_mib": bare["peak_rss_mib"],
        "calibrate_over_bare_rate": rate / bare_rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits-samples", type=int, default=16,
                        help="evaluations per row for the digits cases (antithetic needs 4 "
                        "or more)")
    parser.add_argument("--estimators", default="control_variate,naive,antithetic",
                        help="estimators of the digits cases, comma-separated")
    parser.add_argument("--celeba64", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--celeba64-samples", type=int, default=8)
    parser.add_argument("--celeba64-shards", type=int, default=50,
                        help="the celeba64 cases estimate shard 1 of this many")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/calibrate_throughput.json"))
    args = parser.parse_args()

    before = machine_facts()
    work = Path(tempfile.mkdtemp(prefix="calibrate-throughput-"))
    results = []
    try:
        for case in cases(work, args):
            result = measure(case, work)
            results.append(result)
            print(f"{result['name']}: calibrate {result['calibrate_evaluations_per_second']:.1f}"
                  f" eval/s (peak {result['calibrate_peak_rss_mib']:.0f} MiB), bare "
                  f"{result['bare_evaluations_per_second']:.1f} eval/s (peak "
                  f"{result['bare_peak_rss_mib']:.0f} MiB), ratio "
                  f"{result['calibrate_over_bare_rate']:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_record(args.out, {"machine_before": before, "machine_after": machine_facts(),
                            "results": results})


if __name__ == "__main__":
    main()
