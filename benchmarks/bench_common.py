"""Timing loops, machine facts and JSON records shared by the CPU benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


#: The calibexport command of the running environment, for benchmarks that time it as a process.
CALIBEXPORT = Path(sys.executable).parent / "calibexport"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: a comma-separated list of integers >= 1, such as 1,16."""
    try:
        return [positive_int(item) for item in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 separated by commas, got "
                                         f"{text!r}") from error


def machine_facts() -> dict[str, Any]:
    """Return the host's cores, memory, load average and library versions."""
    facts: dict[str, Any] = {
        "processor_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        facts["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError):
        pass
    for module in ("numpy", "onnxruntime", "torch", "diffusers"):
        try:
            facts[module] = __import__(module).__version__
        except ImportError:
            continue
    return facts


def interleaved(contenders: dict[str, Callable[[], Any]], repeats: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Time each contender ``repeats`` times, one round of all contenders per repeat.

    Rounds alternate their order (ABBA), so a slow drift of the machine's speed affects every
    contender alike. Returns the seconds of every call, by contender.
    """
    for call in contenders.values():
        for _ in range(warmup):
            call()
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def timed_blocks(contenders: dict[str, Callable[[], Any]], rounds: int, block: int,
                 warmup: int = 1) -> dict[str, list[float]]:
    """Time each contender in blocks: ``warmup`` untimed calls, then ``block`` timed calls.

    Each round runs one block of every contender, alternating the order (ABBA). The untimed
    calls at the start of a block let the previous contender's idle threads stop spinning, so
    they do not take cores from the one being timed. Returns the seconds of every timed call.
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            times[name].extend(interleaved({name: contenders[name]}, block, warmup)[name])
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def run_measured(command: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command to completion; return its wall seconds, exit code, peak resident memory
    and output (stdout and stderr together).

    The peak is the largest ``VmHWM`` (the kernel's high-water mark of resident memory for the
    process's own address space) read from ``/proc/PID/status`` every 10 ms while it runs. The
    ``ru_maxrss`` that ``wait4`` returns is not used: Linux carries it over from the forked copy
    of this process across ``exec``, so it reports this process's size for small children.
    """
    start = time.perf_counter()
    peak_kib = 0
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(list(command), env=env, stdout=log, stderr=subprocess.STDOUT)
        status_path = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            peak_kib = max(peak_kib, _high_water_kib(status_path))
            time.sleep(0.01)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    return {"seconds": seconds, "returncode": process.returncode,
            "peak_rss_mib": peak_kib / 1024, "output": output}


def _high_water_kib(status_path: Path) -> int:
    try:
        for line in status_path.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass  # the process exited between poll() and the read
    return 0


def model_spec(architecture: str) -> Any:
    from calibexport.models.presets import LINEAR_DISCRETE_1000, ModelSpec, get_preset
    from calibexport.models.unet import UNetConfig

    if architecture == "celeba64":
        return get_preset("celeba64")
    unet = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                      num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    return ModelSpec(unet=unet, schedule=dict(LINEAR_DISCRETE_1000))


def write_inputs(work_dir: Path, architecture: str, seed: int) -> tuple[Path, Path]:
    """Save a random-weight network and a random eta table; return their paths."""
    import torch

    from calibexport.calibration_tables.table_io import save_eta_table
    from calibexport.models.native_format import save_native
    from calibexport.models.unet import DDPMUNet

    spec = model_spec(architecture)
    torch.manual_seed(seed)
    module = DDPMUNet(spec.unet)
    model_path = work_dir / f"{architecture}-random.safetensors"
    save_native(model_path, module.state_dict(), spec)
    unet = spec.unet
    shape = (spec.schedule["num_timesteps"], unet.in_channels, unet.resolution, unet.resolution)
    eta = np.random.default_rng(seed).normal(0.0, 0.01, shape).astype(np.float32)
    eta_path = work_dir / "eta.npy"
    save_eta_table(eta_path, eta, None)
    return model_path, eta_path


def require_artifact(artifact: Path) -> None:
    """Exit with a one-line message unless ``artifact`` contains a built model.onnx."""
    if not (artifact / "model.onnx").is_file():
        raise SystemExit(f"error: {artifact}/model.onnx not found; run `bash scripts/demo.sh` "
                         "to build the digits demo, or pass --artifact with a build directory.")


def write_record(out: Path, record: dict[str, Any]) -> None:
    """Write the result JSON with the command line that produced it."""
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), **record}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {out}")
