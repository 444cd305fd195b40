"""Export, fold and validate: wall time and peak memory of each, for the celeba64 architecture.

Writes a random-weight network (celeba64 by default: 78.7M parameters, 3x64x64) and a random eta
table, then runs, each as its own process so that its peak resident memory is its own:

* ``plain-export``: ``torch.onnx.export`` of the network alone (dynamo exporter, dynamic batch),
  the step a user would run without calibexport;
* ``build``: ``calibexport build --no-validate`` (export, graph optimization, eta fold, manifest);
* ``validate``: ``calibexport validate`` with the given ``--runs`` and ``--max-rows``.

Each is run ``--repeats`` times in alternating order; medians are reported. The phase times
that ``build`` prints (export, graph optimization) are kept too.

    .venv/bin/python benchmarks/build_cost.py --out benchmarks/results/build_cost.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_common import CALIBEXPORT, machine_facts, run_measured, write_inputs, write_record

PLAIN_EXPORT = """
import sys, torch
from calibexport.models.loaders import load_model
module = load_model(sys.argv[1]).module.eval()
shape = tuple(int(d) for d in sys.argv[3].split(","))
batch = torch.export.Dim("batch")
example = (torch.randn(2, *shape), torch.tensor([1.0, 8.0]))
with torch.no_grad():
    torch.onnx.export(module, example, sys.argv[2], dynamo=True, input_names=["x", "t"],
                      output_names=["eps"], dynamic_shapes=({0: batch}, {0: batch}))
"""

PHASES = {"export_seconds": r"Exported .* in ([0-9.]+)s", "optimize_seconds":
          r"Optimized the graph: .* in ([0-9.]+)s", "build_seconds": r"Built .* in ([0-9.]+)s",
          "reference_seconds": r"Computed the pytorch reference outputs in ([0-9.]+)s",
          "compare_seconds": r"Validation (?:passed|failed) in ([0-9.]+)s"}


def commands(work: Path, model: Path, eta: Path, shape: str, args: argparse.Namespace
             ) -> dict[str, list[str]]:
    cli = [str(CALIBEXPORT)]
    return {
        "plain-export": [sys.executable, "-c", PLAIN_EXPORT, str(model), str(work / "plain.onnx"),
                         shape],
        "build": [*cli, "build", "--model", str(model), "--eta", str(eta), "--out",
                  str(work / "build"), "--no-validate", "--overwrite"],
        "validate": [*cli, "validate", "--artifact", str(work / "build"), "--runs", args.runs,
                     "--max-rows", str(args.max_rows), "--report-dir", str(work / "reports")],
    }


def phase_times(output: str) -> dict[str, float]:
    found = {}
    for name, pattern in PHASES.items():
        match = re.search(pattern, output)
        if match:
            found[name] = float(match.group(1))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="celeba64", choices=["celeba64", "tiny"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--runs", default="quick", help="validate --runs")
    parser.add_argument("--max-rows", type=int, default=20, help="validate --max-rows")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/build_cost.json"))
    args = parser.parse_args()

    before = machine_facts()
    work = Path(tempfile.mkdtemp(prefix="build-cost-"))
    try:
        model, eta = write_inputs(work, args.architecture, seed=0)
        config = json.loads(model.with_suffix(".json").read_text())["unet"]
        shape = f"{config['in_channels']},{config['resolution']},{config['resolution']}"
        steps = commands(work, model, eta, shape, args)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in steps}
        for repeat in range(args.repeats):
            # validate needs the build, so only the export pair alternates.
            order = ["plain-export", "build"] if repeat % 2 == 0 else ["build", "plain-export"]
            for name in [*order, "validate"]:
                result = run_measured(steps[name])
                if result["returncode"] != 0:
                    raise SystemExit(f"{name} failed:\n{result['output'][-3000:]}")
                result["phases"] = phase_times(result.pop("output"))
                runs[name].append(result)
                print(f"{name}: {result['seconds']:.1f} s, peak {result['peak_rss_mib']:.0f} MiB"
                      f" {result['phases']}", flush=True)
        onnx_bytes = sum(f.stat().st_size for f in (work / "build").iterdir())
        parity = json.loads((work / "reports" / "parity.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {name: {"median_seconds": statistics.median(r["seconds"] for r in results),
                      "median_peak_rss_mib": statistics.median(r["peak_rss_mib"]
                                                               for r in results)}
               for name, results in runs.items()}
    for name, values in summary.items():
        print(f"{name}: median {values['median_seconds']:.1f} s, "
              f"peak {values['median_peak_rss_mib']:.0f} MiB")
    write_record(args.out, {
        "machine_before": before, "machine_after": machine_facts(),
        "architecture": args.architecture, "artifact_bytes": onnx_bytes,
        "validate": {"runs": args.runs, "max_rows": args.max_rows,
                     "checks": len(parity.get("checks", [])), "config": parity.get("config")},
        "summary": summary, "runs": runs,
    })


if __name__ == "__main__":
    main()
