"""ONNX Runtime session settings for the CPU backend, timed side by side in one process.

Each variant opens its own ``InferenceSession`` on the same calibrated ``model.onnx`` and
evaluates the same inputs. Only one session exists at a time, because the idle worker threads of
other sessions spin and take the cores away from the one being timed. A block opens one variant's
session, warms it up, times ``--block`` evaluations and closes it. Rounds run one block of every
variant, alternating the order (ABBA). Variants:

* ``default``: the settings ``OnnxRuntimeBackend`` uses (all graph optimizations, one session
  per backend, ONNX Runtime's memory arena and memory pattern on);
* ``opt-disabled``, ``opt-basic``, ``opt-extended``: lower graph optimization levels;
* ``no-arena``, ``no-mem-pattern``: without the CPU memory arena, without memory-pattern
  planning;
* ``iobinding``: inputs and a preallocated output bound once per batch size, run with
  ``run_with_iobinding`` (no output allocation per call);
* ``no-spinning``: intra-op threads sleep between runs instead of spinning (matters with more
  than one thread only).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ort_tuning.py --threads 1,2 \\
        --out benchmarks/results/ort_tuning.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench_common import (
    interleaved, machine_facts, medians, positive_int, positive_ints, require_artifact,
    write_record,
)

VARIANTS = ("default", "opt-disabled", "opt-basic", "opt-extended", "no-arena",
            "no-mem-pattern", "iobinding", "no-spinning")


def session(model: Path, variant: str, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = {
        "opt-disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "opt-basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "opt-extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }.get(variant, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if variant == "no-arena":
        options.enable_cpu_mem_arena = False
    if variant == "no-mem-pattern":
        options.enable_mem_pattern = False
    if variant == "no-spinning":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model), sess_options=options,
                                providers=["CPUExecutionProvider"])


def evaluator(sess: Any, variant: str, x: np.ndarray, t: np.ndarray) -> Callable[[], Any]:
    """Return a call that evaluates the model once at (x, t) with the variant's run method."""
    import onnxruntime as ort

    x_name, t_name = (i.name for i in sess.get_inputs())
    out_name = sess.get_outputs()[0].name
    if variant != "iobinding":
        feeds = {x_name: x, t_name: t}
        return lambda: sess.run([out_name], feeds)
    binding = sess.io_binding()
    binding.bind_cpu_input(x_name, x)
    binding.bind_cpu_input(t_name, t)
    out = np.empty_like(x)
    binding.bind_ortvalue_output(out_name, ort.OrtValue.ortvalue_from_numpy(out))
    return lambda: sess.run_with_iobinding(binding)


def inputs(sess: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
    x_info, t_info = sess.get_inputs()
    x = np.random.default_rng(batch).standard_normal((batch, *x_info.shape[1:]), dtype=np.float32)
    t_dtype = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}.get(t_info.type, np.float32)
    return x, np.full(batch, 500, dtype=t_dtype)


def session_blocks(model: Path, variants: list[str], threads: int, batch: int, rounds: int,
                 block: int) -> dict[str, list[float]]:
    """Return the seconds of every timed evaluation, by variant, from alternating blocks."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(rounds):
        for variant in variants if round_ % 2 == 0 else reversed(variants):
            sess = session(model, variant, threads)
            call = evaluator(sess, variant, *inputs(sess, batch))
            block_times = interleaved({variant: call}, block, warmup=10)[variant]
            times[variant].extend(block_times)
            del call, sess
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=Path("demo-output/build"))
    parser.add_argument("--batch-sizes", type=positive_ints, default="1,16")
    parser.add_argument("--threads", type=positive_ints, default="1,2",
                        help="intra-op thread counts, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=positive_int, default=6, help="blocks per variant")
    parser.add_argument("--block", type=positive_int, default=50,
                        help="timed evaluations per block")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ort_tuning.json"))
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "default" not in variants:
        parser.error(f"--variants must include default and name only {', '.join(VARIANTS)}; "
                     f"unknown: {', '.join(unknown) or 'none'}")

    require_artifact(args.artifact)
    model = args.artifact / "model.onnx"
    before = machine_facts()
    results: dict[str, Any] = {}
    for threads in args.threads:
        for batch in args.batch_sizes:
            times = session_blocks(model, variants, threads, batch, args.rounds, args.block)
            med = medians(times)
            base = med["default"]
            key = f"threads={threads},batch={batch}"
            results[key] = {"median_ms": {v: m * 1e3 for v, m in med.items()},
                            "ratio_to_default": {v: m / base for v, m in med.items()}}
            print(key + ": " + ", ".join(f"{v} {m * 1e3:.3f} ms ({m / base:.3f})"
                                         for v, m in med.items()), flush=True)
    write_record(args.out, {"machine_before": before, "machine_after": machine_facts(),
                            "model": str(model), "rounds": args.rounds, "block": args.block,
                            "results": results})


if __name__ == "__main__":
    main()
