#!/usr/bin/env bash
# Run the GPU tests and a short GPU benchmark on a host with an NVIDIA GPU, in under 8 minutes.
#
# Installs nothing: it uses the repository's .venv, which must already contain TensorRT 10+,
# cuda-python and onnxruntime-gpu (pip install -e '.[gpu,dev]' cuda-python). Writes one results
# file, OUT_DIR/gpu_check.json (default gpu-results/), with the test summary, the benchmark
# numbers and the GPU, next to the full logs gpu-tests.log and benchmark.log.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Exit status: 0 when the GPU tests passed and the benchmark completed, 1 otherwise.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$(mkdir -p "${1:-gpu-results}" && cd "${1:-gpu-results}" && pwd)"
PYTHON="$ROOT/.venv/bin/python"
# Time limits in seconds: 210 + 240 leaves 30 of the 480 for start-up and the summary.
TEST_SECONDS="${GPU_CHECK_TEST_SECONDS:-210}"
BENCHMARK_SECONDS="${GPU_CHECK_BENCHMARK_SECONDS:-240}"

if [[ ! -x "$PYTHON" ]]; then
    echo "error: $PYTHON not found; create the environment with scripts/setup-venv.sh first." >&2
    exit 1
fi
if ! command -v nvidia-smi >/dev/null; then
    echo "error: nvidia-smi not found; run this on a host with an NVIDIA GPU and driver." >&2
    exit 1
fi
cd "$ROOT"
start=$(date +%s)
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader \
    > "$OUT_DIR/nvidia-smi.txt"

echo "Running the GPU tests (limit ${TEST_SECONDS}s) ..." >&2
tests_status=0
timeout "$TEST_SECONDS" "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider tests \
    --junitxml "$OUT_DIR/gpu-tests.xml" > "$OUT_DIR/gpu-tests.log" 2>&1 || tests_status=$?

echo "Running the GPU benchmark (limit ${BENCHMARK_SECONDS}s) ..." >&2
benchmark_status=0
timeout "$BENCHMARK_SECONDS" "$PYTHON" benchmarks/gpu_benchmark.py \
    --out "$OUT_DIR/benchmark.json" > "$OUT_DIR/benchmark.log" 2>&1 || benchmark_status=$?

"$PYTHON" - "$OUT_DIR" "$tests_status" "$benchmark_status" "$(( $(date +%s) - start ))" <<'PY'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out_dir, tests_status, benchmark_status, seconds = Path(sys.argv[1]), *map(int, sys.argv[2:])
summary = {"tests_exit_status": tests_status, "benchmark_exit_status": benchmark_status,
           "seconds": seconds, "timed_out": [],
           "gpu": (out_dir / "nvidia-smi.txt").read_text().strip()}
# timeout(1) exits with 124 when it stops a command at its limit.
if tests_status == 124:
    summary["timed_out"].append("tests")
if benchmark_status == 124:
    summary["timed_out"].append("benchmark")
junit = out_dir / "gpu-tests.xml"
if junit.is_file():
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = suite.findall("testcase")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = [f"{c.get('classname')}::{c.get('name')}: {c.find('skipped').get('message')}"
               for c in cases if c.find("skipped") is not None]
    summary["tests"] = {"total": len(cases), "failed": failed, "skipped": skipped,
                        "passed": len(cases) - len(failed) - len(skipped)}
benchmark = out_dir / "benchmark.json"
if benchmark.is_file():
    summary["benchmark"] = json.loads(benchmark.read_text())
(out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"Wrote {out_dir / 'gpu_check.json'}")
PY

if [[ "$tests_status" -ne 0 || "$benchmark_status" -ne 0 ]]; then
    echo "GPU check failed: tests exit status $tests_status, benchmark exit status" \
        "$benchmark_status (see $OUT_DIR)." >&2
    exit 1
fi
skipped=$(grep -c '<skipped' "$OUT_DIR/gpu-tests.xml" || true)
if [[ "$skipped" -gt 0 ]]; then
    echo "warning: $skipped GPU tests were skipped; gpu_check.json lists what they need." >&2
fi
echo "GPU check passed in $(( $(date +%s) - start ))s; results in $OUT_DIR/gpu_check.json." >&2
