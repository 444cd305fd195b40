#!/usr/bin/env bash
# Set up .venv if needed, then run the whole pipeline on the bundled digits model:
# calibrate -> build (export, fold, validate) -> sample. Outputs go to demo-output/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-venv.sh"
cd "$root"

out="${DEMO_OUT:-demo-output}"
model="examples/digits/digits.safetensors"
cli=".venv/bin/calibexport"

"$cli" calibrate --model "$model" --data digits --out "$out/eta.npy" --num-samples "${DEMO_SAMPLES:-64}"
"$cli" build --model "$model" --eta "$out/eta.npy" --out "$out/build" --overwrite
"$cli" sample --artifact "$out/build" -n 64 --steps 20 --order 3 --out "$out/samples.png"
echo "Done: $out/eta.npy, $out/build/model.onnx, $out/build/parity.md, $out/samples.png"
