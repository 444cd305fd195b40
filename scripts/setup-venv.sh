#!/usr/bin/env bash
# Create .venv at the repository root if it is missing and install calibexport into it.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "Creating $venv" >&2
    "$python" -m venv "$venv"
fi

stamp="$venv/.calibexport-install-stamp"
wanted="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        # No NVIDIA GPU: install the CPU build of torch first, so that the torch range in
        # pyproject.toml is already satisfied and pip does not fetch a multi-GB CUDA build.
        # The "+cpu" local version exists only as the CPU build: a local wheel or pip's
        # configured indexes are tried first, then PyTorch's CPU index.
        "$venv/bin/python" -m pip install --quiet "torch==2.13.0+cpu" \
            || "$venv/bin/python" -m pip install --quiet "torch==2.13.0+cpu" \
                --extra-index-url https://download.pytorch.org/whl/cpu
    fi
    "$venv/bin/python" -m pip install --quiet -e "$root[dev]"
    echo "$wanted" > "$stamp"
fi
