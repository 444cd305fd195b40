"""NaN/Inf scans of an fp16 build over every timestep, in ONNX Runtime.

Two scans run, each over the timesteps 0..T-1 with one N(0, I) image per timestep (seeded per
timestep) and a few timesteps per call:

* ``scan_non_finite`` evaluates the built fp16 model and fails on the first NaN or Inf output.
* ``scan_fp16_range`` evaluates the float32 network with every value that the fp16 graph
  computes in float16 as an extra output. It fails on the first timestep where one of them
  exceeds float16's maximum of 65504, because the fp16 model would overflow there.

The second scan is needed on the CPU: ONNX Runtime's CPU provider (1.32) has no float16 kernels
for many ops (Mul, Add, ...), so it computes them in float32 between inserted casts and then
drops the cast pairs, and an intermediate that overflows float16 on a GPU stays finite there.
This module needs onnx and onnxruntime, never torch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from calibexport.errors import CalibexportError
from calibexport.exporter.fp16 import FLOAT16_MAX

logger = logging.getLogger(__name__)

#: Timesteps evaluated per ONNX Runtime call.
SCAN_BATCH = 16
_MAX_LISTED = 8


def scan_non_finite(model_path: str | Path, *, num_timesteps: int, batch_size: int = SCAN_BATCH,
                    seed: int = 0) -> None:
    """Evaluate the model at every timestep 0..T-1 and raise on the first NaN or Inf output."""
    from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from calibexport.runtime.noise import initial_noise

    start = time.perf_counter()
    bad: list[int] = []
    with OnnxRuntimeBackend(model_path) as backend:
        for timesteps in _batches(num_timesteps, batch_size):
            x = initial_noise(seed, timesteps, backend.image_shape)
            eps = backend.eps(x, timesteps.astype(np.float64))
            finite = np.isfinite(eps.reshape(len(timesteps), -1)).all(axis=1)
            bad.extend(int(t) for t in timesteps[~finite])
    if bad:
        raise CalibexportError(
            f"the fp16 model outputs NaN or Inf at timestep {bad[0]} (the first of {len(bad)} "
            f"bad timesteps of {num_timesteps}: {_listed(bad)}). Build with --precision fp32, or "
            "rescale the network's weights."
        )
    logger.info("NaN/Inf scan passed: the fp16 model is finite at all %d timesteps (%.1fs).",
                num_timesteps, time.perf_counter() - start)


def scan_fp16_range(network: onnx.ModelProto, fp16_values: list[str], *, num_timesteps: int,
                    batch_size: int = SCAN_BATCH, seed: int = 0) -> None:
    """Raise if a value computed in float16 exceeds 65504 at some timestep of the float32 network.

    ``network`` is the float32 graph that ``convert_to_fp16`` converted, and ``fp16_values`` its
    ``Fp16Report.fp16_values``. A batch with an overflow is evaluated again one timestep at a
    time, so the error names the first bad timestep and the value that overflows there.
    """
    import onnxruntime as ort

    start = time.perf_counter()
    probe = _with_outputs(network, fp16_values)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    bad: dict[int, tuple[str, float]] = {}
    for timesteps in _batches(num_timesteps, batch_size):
        if _peak(session, network, timesteps, seed) is None:
            continue
        for timestep in timesteps:
            peak = _peak(session, network, np.array([timestep]), seed)
            if peak is not None:
                bad[int(timestep)] = peak
    if bad:
        first = min(bad)
        name, value = bad[first]
        raise CalibexportError(
            f"the fp16 model overflows at timestep {first} (the first of {len(bad)} bad "
            f"timesteps of {num_timesteps}: {_listed(sorted(bad))}): value {name!r}, computed in "
            f"float16, reaches {value:.4g} beyond float16's maximum {FLOAT16_MAX:g}. Build with "
            "--precision fp32, or rescale the network's weights."
        )
    logger.info("fp16 range scan passed: %d float16 values stay below %g at all %d timesteps "
                "(%.1fs).", len(fp16_values), FLOAT16_MAX, num_timesteps,
                time.perf_counter() - start)


def _with_outputs(network: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(network)
    existing = {value.name for value in (*probe.graph.output, *probe.graph.input)}
    for name in names:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                    None))
    return probe


def _peak(session: object, network: onnx.ModelProto, timesteps: np.ndarray,
          seed: int) -> tuple[str, float] | None:
    """Return (name, max |value|) of the worst value past FLOAT16_MAX, or None if all fit."""
    from calibexport.runtime.noise import initial_noise

    inputs = {value.name: value for value in network.graph.input}
    image_name = next(name for name, value in inputs.items()
                      if len(value.type.tensor_type.shape.dim) == 4)
    image_shape = [d.dim_value for d in inputs[image_name].type.tensor_type.shape.dim[1:]]
    feeds = {image_name: initial_noise(seed, timesteps, tuple(image_shape))}
    for name, value in inputs.items():
        if name != image_name:
            dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            feeds[name] = timesteps.astype(dtype)
    names = [output.name for output in session.get_outputs()]  # type: ignore[attr-defined]
    worst: tuple[str, float] | None = None
    for name, array in zip(names, session.run(None, feeds)):  # type: ignore[attr-defined]
        magnitude = float(np.max(np.abs(array))) if array.size else 0.0
        if not magnitude <= FLOAT16_MAX and (worst is None or magnitude > worst[1]):
            worst = (name, magnitude)
    return worst


def _batches(num_timesteps: int, batch_size: int) -> list[np.ndarray]:
    if num_timesteps < 1 or batch_size < 1:
        raise CalibexportError(
            f"num_timesteps and batch_size must be >= 1, got {num_timesteps} and {batch_size}."
        )
    return [np.arange(first, min(first + batch_size, num_timesteps))
            for first in range(0, num_timesteps, batch_size)]


def _listed(timesteps: list[int]) -> str:
    more = " ..." if len(timesteps) > _MAX_LISTED else ""
    return f"{timesteps[:_MAX_LISTED]}{more}"
