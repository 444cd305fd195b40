"""ONNX Runtime CUDA backend: ``model.onnx`` on CUDAExecutionProvider with IO binding.

TF32 is off unless requested. ONNX Runtime's CUDA provider enables TF32 for fp32 matmuls and
convolutions by default (``use_tf32=1``), and PyTorch's matmuls do not use it, so the default
would leave an error of about 1e-3 per evaluation that accumulates over a sampling loop.
Inputs and outputs live in OrtValues allocated once per batch size and bound with
``io_binding``, so a call copies x and t in and eps out without allocating.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.exporter.engine_cache import nvidia_gpu_missing_reason
from calibexport.runtime.backends.onnxruntime import _ONNX_TO_NUMPY, OnnxRuntimeBackend

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"


def cuda_provider_options(device_id: int = 0, tf32: bool = False) -> dict[str, str]:
    """Return the CUDAExecutionProvider options: the device and TF32 (off unless requested)."""
    if int(device_id) < 0:
        raise CalibexportError(f"CUDA device_id must be >= 0, got {device_id}.")
    return {"device_id": str(int(device_id)), "use_tf32": "1" if tf32 else "0"}


def onnxruntime_cuda_unavailable_reason() -> str | None:
    """Return why ONNX Runtime cannot use a CUDA GPU here, or None."""
    try:
        import onnxruntime
    except ImportError:
        return "the onnxruntime-gpu package is not installed"
    if CUDA_PROVIDER not in onnxruntime.get_available_providers():
        return (f"ONNX Runtime {onnxruntime.__version__} has no {CUDA_PROVIDER} (providers: "
                f"{', '.join(onnxruntime.get_available_providers())}); install onnxruntime-gpu "
                "in place of onnxruntime")
    return nvidia_gpu_missing_reason()


class IOBindingRunner:
    """Run one session through IO binding with OrtValues allocated once per batch size.

    ``device_type`` is ``"cuda"`` for the CUDA provider; ``"cpu"`` runs the same binding code on
    the CPU provider.
    """

    def __init__(self, session: Any, x_input: str, timestep_input: str, timestep_dtype: np.dtype,
                 device_type: str = "cuda", device_id: int = 0) -> None:
        self.session = session
        self.binding = session.io_binding()
        self.x_input, self.timestep_input = x_input, timestep_input
        self.timestep_dtype = np.dtype(timestep_dtype)
        output = session.get_outputs()[0]
        self.output_name = output.name
        if output.type not in _ONNX_TO_NUMPY:
            raise CalibexportError(f"unsupported output type {output.type} of {output.name!r}.")
        self.output_dtype = np.dtype(_ONNX_TO_NUMPY[output.type])
        self.device_type, self.device_id = device_type, device_id
        # batch size -> (x, t, eps) OrtValues on the device.
        self._buffers: dict[int, tuple[Any, Any, Any]] = {}

    def _buffers_for(self, batch: int, image_shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
        if batch not in self._buffers:
            import onnxruntime as ort

            def allocate(shape: tuple[int, ...], dtype: np.dtype) -> Any:
                return ort.OrtValue.ortvalue_from_shape_and_type(
                    list(shape), dtype, self.device_type, self.device_id)

            self._buffers[batch] = (allocate((batch, *image_shape), np.dtype(np.float32)),
                                    allocate((batch,), self.timestep_dtype),
                                    allocate((batch, *image_shape), self.output_dtype))
            logger.debug("Allocated IO binding buffers for batch %d on %s:%d.", batch,
                         self.device_type, self.device_id)
        return self._buffers[batch]

    def run(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        x_value, t_value, out_value = self._buffers_for(x.shape[0], tuple(x.shape[1:]))
        x_value.update_inplace(np.ascontiguousarray(x, dtype=np.float32))
        t_value.update_inplace(np.ascontiguousarray(timestep, dtype=self.timestep_dtype))
        self.binding.bind_ortvalue_input(self.x_input, x_value)
        self.binding.bind_ortvalue_input(self.timestep_input, t_value)
        self.binding.bind_ortvalue_output(self.output_name, out_value)
        self.session.run_with_iobinding(self.binding)
        # On the CPU, numpy() is a view of the bound buffer that the next call overwrites.
        return np.array(out_value.numpy(), dtype=np.float32, copy=True)

    def buffer_count(self) -> int:
        return len(self._buffers)


class OnnxRuntimeCudaBackend(OnnxRuntimeBackend):
    """Run ``eps(x, t)`` on ONNX Runtime's CUDA provider, with IO binding and TF32 off by default.

    Raises CalibexportError when the CUDA provider is not available, instead of letting ONNX
    Runtime fall back to the CPU silently. ``tf32`` records what the session reports.
    """

    name = "onnxruntime-cuda"

    def __init__(self, model_path: str | Path, *, device_id: int = 0, tf32: bool = False,
                 x_input: str = "x", timestep_input: str | None = None) -> None:
        reason = onnxruntime_cuda_unavailable_reason()
        if reason:
            raise CalibexportError(f"the onnxruntime-cuda backend cannot run: {reason}.")
        providers: list[Any] = [(CUDA_PROVIDER, cuda_provider_options(device_id, tf32)),
                                "CPUExecutionProvider"]
        super().__init__(model_path, providers=providers, x_input=x_input,
                         timestep_input=timestep_input)
        active = self.session.get_providers()
        if not active or active[0] != CUDA_PROVIDER:
            raise CalibexportError(
                f"ONNX Runtime did not enable {CUDA_PROVIDER} for {model_path} (active providers: "
                f"{active}); check the CUDA and cuDNN libraries that onnxruntime-gpu needs."
            )
        options = self.session.get_provider_options().get(CUDA_PROVIDER, {})
        self.tf32 = str(options.get("use_tf32", "1" if tf32 else "0")) == "1"
        if self.tf32 != tf32:
            raise CalibexportError(f"ONNX Runtime reports use_tf32={options.get('use_tf32')} "
                                   f"although tf32={tf32} was requested.")
        self.device_id = device_id
        self.runner = IOBindingRunner(self.session, self.x_input, self.timestep_input,
                                      self.timestep_dtype, "cuda", device_id)
        logger.info("Opened %s on %s device %d (TF32 %s).", model_path, CUDA_PROVIDER, device_id,
                    "on" if self.tf32 else "off")

    def _eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        return self.runner.run(x, timestep)

    def close(self) -> None:
        self.runner = None
        super().close()
