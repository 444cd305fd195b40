"""What the CPU benchmarks share: the machine description, timing loops and the JSON record."""

from __future__ import annotations

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
    """Run a command to completion; return its wall seconds, exit code and peak resident memory.

    The peak is the child's maximum resident set size from ``wait4``, so it counts that process
    alone, not this one.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(list(command), env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    return {"seconds": seconds, "returncode": process.returncode,
            "peak_rss_mib": usage.ru_maxrss / 1024, "output_tail": output[-2000:]}


def write_record(out: Path, record: dict[str, Any]) -> None:
    """Write the result JSON with the command line that produced it."""
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), **record}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {out}")
