"""ONNX Runtime backend: evaluates a calibrated ``model.onnx`` on the CPU or a CUDA provider."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.runtime.backends.base import EpsBackend

logger = logging.getLogger(__name__)

_ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


class OnnxRuntimeBackend(EpsBackend):
    """Run ``eps(x, t)`` through an ONNX Runtime InferenceSession.

    The graph must have inputs ``x`` [B, C, H, W] and one timestep input [B]; the timestep's
    dtype is read from the model, so int32, int64, float32 and float64 graphs all work.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        *,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        x_input: str = "x",
        timestep_input: str | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise CalibexportError(
                "the onnxruntime backend needs the onnxruntime package; install it with "
                "`pip install onnxruntime` (or onnxruntime-gpu on GPU hosts)."
            ) from error

        model_path = Path(model_path)
        if not model_path.is_file():
            raise CalibexportError(f"ONNX model not found: {model_path}.")
        # Settings from benchmarks/ort_tuning.py (docs/benchmarks.md, "ONNX Runtime settings"),
        # digits model on 2 cores:
        # - all graph optimizations: 1.4-1.75x faster than extended, basic or none;
        # - memory arena and memory pattern stay on: turning either off was 5-7% slower with
        #   two threads and no faster with one;
        # - intra-op threads default to ONNX Runtime's choice (one per physical core): two
        #   threads were 1.25x faster than one at batch 1 and 1.8x at batch 16;
        # - spinning threads stay on: sleeping between runs was 1.2-1.5x slower with two threads;
        # - no IO binding: a preallocated output was 4-5% slower with two threads and within 1.3%
        #   with one, and the solvers keep earlier outputs, so a reused buffer would need copies.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(
                str(model_path),
                sess_options=options,
                providers=providers or ["CPUExecutionProvider"],
            )
        except Exception as error:  # onnxruntime raises several private exception types
            raise CalibexportError(f"ONNX Runtime could not load {model_path}: {error}") from error

        inputs = {i.name: i for i in self.session.get_inputs()}
        if x_input not in inputs:
            raise CalibexportError(
                f"{model_path} has no input named {x_input!r}; inputs: {sorted(inputs)}."
            )
        others = [name for name in inputs if name != x_input]
        if timestep_input is None:
            if len(others) != 1:
                raise CalibexportError(
                    f"{model_path} must have exactly one timestep input besides {x_input!r}; "
                    f"found {others}. Name it explicitly."
                )
            timestep_input = others[0]
        if timestep_input not in inputs:
            raise CalibexportError(
                f"{model_path} has no input named {timestep_input!r}; inputs: {sorted(inputs)}."
            )

        x_shape = inputs[x_input].shape
        if len(x_shape) != 4 or not all(isinstance(d, int) for d in x_shape[1:]):
            raise CalibexportError(
                f"input {x_input!r} must be [B, C, H, W] with static C, H, W; got {x_shape}."
            )
        self.image_shape = tuple(int(d) for d in x_shape[1:])
        t_type = inputs[timestep_input].type
        if t_type not in _ONNX_TO_NUMPY:
            raise CalibexportError(f"unsupported timestep input type {t_type} in {model_path}.")
        self.timestep_dtype = np.dtype(_ONNX_TO_NUMPY[t_type])
        self.x_input = x_input
        self.timestep_input = timestep_input
        self.output_name = self.session.get_outputs()[0].name
        self.model_path = model_path
        self.metadata: dict[str, Any] = dict(self.session.get_modelmeta().custom_metadata_map)
        logger.debug("Opened %s with providers %s", model_path, self.session.get_providers())

    def _eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        feeds = {self.x_input: x, self.timestep_input: timestep}
        return self.session.run([self.output_name], feeds)[0]

    def close(self) -> None:
        self.session = None
