"""TensorRT backend: runs an artifact's ``model.plan`` on one CUDA device (TensorRT 10+ API).

Device and pinned host buffers are allocated once, for the largest batch of the engine's
optimization profile. Every evaluation runs on one CUDA stream: copy in, execute, copy out,
synchronize. With ``cuda_graph_batch`` set, the execution for that batch size is captured once
as a CUDA graph and replayed, which removes per-layer launch overhead.

``tensorrt`` and cuda-python (for memory, streams and graphs) are imported when a backend opens,
so this module imports without them. The engine is checked against ``engine.json`` and this host
before TensorRT deserializes it (see ``calibexport.exporter.engine_cache``).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.exporter.engine_cache import (
    ENGINE_FILENAME,
    EngineMetadata,
    check_batch_in_profile,
    check_engine_usable,
    current_host_facts,
    import_cuda_runtime,
    nvidia_gpu_missing_reason,
    read_engine_metadata,
)
from calibexport.runtime.backends.base import EpsBackend

logger = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10
# TensorRT DataType member name -> numpy dtype name ("bfloat16" and fp8 have no numpy dtype).
_TENSORRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "FP8": "float8",
}
_TIMESTEP_DTYPES = ("float32", "float16", "int32", "int64")


def tensorrt_dtype_name(dtype: Any) -> str:
    """Return the numpy name of a ``tensorrt.DataType`` (or of its member name), e.g. ``int64``."""
    name = getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1]
    if name not in _TENSORRT_DTYPES:
        raise CalibexportError(f"unknown TensorRT data type {dtype!r}.")
    return _TENSORRT_DTYPES[name]


def tensorrt_version_problem(version: str) -> str | None:
    """Return why TensorRT ``version`` is too old for calibexport, or None."""
    major = str(version).split(".", 1)[0]
    if not major.isdigit():
        return f"cannot read the TensorRT version {version!r}"
    if int(major) < MIN_TENSORRT_MAJOR:
        return (f"TensorRT {version} is installed, but calibexport needs TensorRT "
                f"{MIN_TENSORRT_MAJOR} or newer (strongly typed networks, int64 tensors)")
    return None


def tensorrt_missing_reason() -> str | None:
    """Return why TensorRT cannot run here (package or GPU missing, version too old), or None."""
    try:
        import tensorrt
    except (ImportError, OSError) as error:
        return ("the tensorrt package is not installed or does not load "
                f"({error}); install TensorRT 10+ on a GPU host (pip install calibexport[gpu])")
    return tensorrt_version_problem(tensorrt.__version__) or nvidia_gpu_missing_reason()


def tensorrt_backend_unavailable_reason() -> str | None:
    """Return why the TensorRT backend cannot run here (TensorRT, cuda-python or GPU), or None."""
    reason = tensorrt_missing_reason()
    if reason:
        return reason
    if import_cuda_runtime() is None:
        return "the cuda-python package is not installed (pip install cuda-python)"
    return None


def timestep_array(timestep: np.ndarray, dtype: str | np.dtype) -> np.ndarray:
    """Cast timesteps to the engine's input dtype, rejecting values that the dtype cannot hold."""
    dtype = np.dtype(dtype)
    timestep = np.asarray(timestep)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if timestep.size and (timestep.min() < info.min or timestep.max() > info.max):
            raise CalibexportError(
                f"timesteps {timestep.min()}..{timestep.max()} do not fit the engine's {dtype} "
                "timestep input; pass model input times within the table range."
            )
        if not np.array_equal(np.round(timestep), timestep):
            raise CalibexportError(
                f"the engine takes {dtype} timesteps but got non-integer values; round them first."
            )
    return np.ascontiguousarray(timestep, dtype=dtype)


def _import_tensorrt() -> Any:
    reason = tensorrt_missing_reason()
    if reason:
        raise CalibexportError(f"the TensorRT backend cannot run: {reason}.")
    import tensorrt

    return tensorrt


def _import_cuda_runtime() -> Any:
    cudart = import_cuda_runtime()
    if cudart is None:
        raise CalibexportError(
            "the TensorRT backend needs cuda-python for device memory and streams; install it "
            "with `pip install cuda-python`."
        )
    return cudart


class CudaRuntime:
    """The CUDA runtime calls of the TensorRT backend, through cuda-python; errors raise."""

    def __init__(self, cudart: Any, device: int) -> None:
        self.cudart = cudart
        self.device = device
        self.call("cudaSetDevice", device)

    def call(self, function: str, *args: Any) -> Any:
        """Call ``cudart.<function>(*args)`` and return its results after the error code."""
        result = getattr(self.cudart, function)(*args)
        if not isinstance(result, tuple):
            result = (result,)
        error, values = result[0], result[1:]
        if int(error) != 0:
            _, text = self.cudart.cudaGetErrorString(error)
            text = text.decode() if isinstance(text, bytes) else str(text)
            raise CalibexportError(f"CUDA {function} failed on device {self.device}: {text} "
                                   f"(error {int(error)}).")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, np.ndarray]:
        """Allocate pinned host memory; return its pointer and a numpy view of it."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        pointer = int(self.call("cudaMallocHost", nbytes))
        raw = (ctypes.c_uint8 * nbytes).from_address(pointer)
        return pointer, np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)

    def copy_async(self, destination: int, source: int, nbytes: int, kind: str,
                   stream: Any) -> None:
        kinds = self.cudart.cudaMemcpyKind
        self.call("cudaMemcpyAsync", destination, source, nbytes, getattr(kinds, kind), stream)


class TensorRTBackend(EpsBackend):
    """Evaluate ``eps(x, t)`` with the TensorRT engine in ``engine_dir`` (model.plan, engine.json).

    The engine is rejected before deserialization when ``engine.json`` names another TensorRT
    version, GPU or compute capability than this host, another ONNX file or eta table than
    ``onnx_sha256``/``eta_sha256`` (not compared when None), or a plan with another digest.
    A batch outside the engine's optimization profile raises CalibexportError.
    """

    name = "tensorrt"

    def __init__(self, engine_dir: str | Path, *, onnx_sha256: str | None = None,
                 eta_sha256: str | None = None, cuda_graph_batch: int | None = None,
                 device: int = 0, x_input: str = "x") -> None:
        self.engine_dir = Path(engine_dir)
        self.plan_path = self.engine_dir / ENGINE_FILENAME
        self._resources_open = False
        self.metadata = read_engine_metadata(self.engine_dir)
        trt = _import_tensorrt()
        host = current_host_facts(trt.__version__, device)
        check_engine_usable(self.engine_dir, self.metadata, host,
                            onnx_sha256=onnx_sha256 or self.metadata.key.onnx_sha256,
                            eta_sha256=eta_sha256 or self.metadata.key.eta_sha256)
        self.profile = self.metadata.key.profile
        if cuda_graph_batch is not None:
            check_batch_in_profile(cuda_graph_batch, self.profile, self.plan_path)
        self.cuda_graph_batch = cuda_graph_batch
        self._read_io(self.metadata, x_input)
        cudart = _import_cuda_runtime()
        try:
            self._open(trt, cudart, device)
        except BaseException:
            self.close()
            raise
        logger.info("Opened TensorRT engine %s (TensorRT %s, %s, batch sizes %s%s).",
                    self.plan_path, host.tensorrt_version, host.gpu_name, self.profile.text(),
                    f", CUDA graph for batch {cuda_graph_batch}" if cuda_graph_batch else "")

    @classmethod
    def from_artifact(cls, artifact_dir: str | Path, **options: Any) -> TensorRTBackend:
        """Open the engine of a build directory, checked against its manifest's ONNX and eta."""
        from calibexport.runtime.artifact import load_manifest

        artifact_dir = Path(artifact_dir)
        manifest = load_manifest(artifact_dir)
        onnx_sha256 = manifest.files.get("model.onnx")
        eta_sha256 = (manifest.raw.get("eta") or {}).get("values_sha256")
        if not onnx_sha256 or not eta_sha256:
            raise CalibexportError(
                f"{artifact_dir / 'manifest.json'} records no model.onnx or eta digest, so its "
                "engine cannot be checked; rebuild the artifact with `calibexport build`."
            )
        return cls(artifact_dir, onnx_sha256=onnx_sha256, eta_sha256=eta_sha256, **options)

    def _read_io(self, metadata: EngineMetadata, x_input: str) -> None:
        """Take the tensor names, image shape and dtypes from ``engine.json``."""
        inputs, outputs = metadata.inputs(), metadata.outputs()
        others = [name for name in inputs if name != x_input]
        if x_input not in inputs or len(others) != 1 or len(outputs) != 1:
            raise CalibexportError(
                f"{self.plan_path} must have inputs {x_input!r} and one timestep input and one "
                f"output; engine.json lists inputs {sorted(inputs)} and outputs {sorted(outputs)}."
            )
        self.x_input, self.timestep_input = x_input, others[0]
        self.output_name = next(iter(outputs))
        x_shape = inputs[x_input]["shape"]
        if len(x_shape) != 4 or min(x_shape[1:]) < 1:
            raise CalibexportError(f"input {x_input!r} of {self.plan_path} must be [B, C, H, W] "
                                   f"with static C, H, W; engine.json has {x_shape}.")
        self.image_shape = tuple(int(d) for d in x_shape[1:])
        t_dtype = inputs[self.timestep_input]["dtype"]
        if t_dtype not in _TIMESTEP_DTYPES:
            raise CalibexportError(f"unsupported timestep input dtype {t_dtype} in "
                                   f"{self.plan_path}; supported: {', '.join(_TIMESTEP_DTYPES)}.")
        self.timestep_dtype = np.dtype(t_dtype)
        self.x_dtype = np.dtype(inputs[x_input]["dtype"])
        self.output_dtype = np.dtype(outputs[self.output_name]["dtype"])

    def _open(self, trt: Any, cudart: Any, device: int) -> None:
        """Deserialize the engine and allocate the stream and every buffer once."""
        self.cuda = CudaRuntime(cudart, device)
        self._host_pointers: list[int] = []
        self._device_pointers: list[int] = []
        self._graph = self._graph_exec = None
        self._resources_open = True
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise CalibexportError(f"TensorRT could not deserialize {self.plan_path} (see the "
                                   "TensorRT log above); rebuild it with `calibexport build`.")
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.call("cudaStreamCreate")
        self._stream_handle = int(self.stream)

        batch = self.profile.max
        shapes = {self.x_input: ((batch, *self.image_shape), self.x_dtype),
                  self.timestep_input: ((batch,), self.timestep_dtype),
                  self.output_name: ((batch, *self.image_shape), self.output_dtype)}
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, int] = {}
        for name, (shape, dtype) in shapes.items():
            pointer, self._host[name] = self.cuda.host_array(shape, dtype)
            self._host_pointers.append(pointer)
            self._device[name] = int(self.cuda.call("cudaMalloc", self._host[name].nbytes))
            self._device_pointers.append(self._device[name])
            if not self.context.set_tensor_address(name, self._device[name]):
                raise CalibexportError(f"TensorRT rejected the buffer of tensor {name!r} in "
                                       f"{self.plan_path}.")
        self._batch: int | None = None
        if self.cuda_graph_batch is not None:
            self._capture_graph(self.cuda_graph_batch)

    def _set_batch(self, batch: int) -> None:
        if batch == self._batch:
            return
        for name, shape in ((self.x_input, (batch, *self.image_shape)),
                            (self.timestep_input, (batch,))):
            if not self.context.set_input_shape(name, shape):
                raise CalibexportError(f"TensorRT rejected shape {list(shape)} for input {name!r} "
                                       f"of {self.plan_path} (profile {self.profile.text()}).")
        self._batch = batch

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self._stream_handle):
            raise CalibexportError(f"TensorRT execution of {self.plan_path} failed for batch "
                                   f"{self._batch} (see the TensorRT log above).")

    def _capture_graph(self, batch: int) -> None:
        """Capture one execution at ``batch`` as a CUDA graph, after a warm-up execution."""
        self._set_batch(batch)
        # TensorRT does lazy setup in its first execution, which a graph must not contain.
        self._execute()
        self.cuda.call("cudaStreamSynchronize", self.stream)
        capture_mode = self.cuda.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        self.cuda.call("cudaStreamBeginCapture", self.stream, capture_mode)
        try:
            self._execute()
        finally:
            self._graph = self.cuda.call("cudaStreamEndCapture", self.stream)
        self._graph_exec = self.cuda.call("cudaGraphInstantiate", self._graph, 0)
        logger.debug("Captured a CUDA graph of %s for batch %d.", self.plan_path, batch)

    def eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        """Return eps as ``EpsBackend.eps`` does; reject timesteps the input dtype cannot hold."""
        return super().eps(x, timestep_array(np.asarray(timestep), self.timestep_dtype))

    def _eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        if not self._resources_open:
            raise CalibexportError(f"the TensorRT backend for {self.plan_path} is closed.")
        batch = x.shape[0]
        check_batch_in_profile(batch, self.profile, self.plan_path)
        host, device = self._host, self._device
        host[self.x_input][:batch] = x
        host[self.timestep_input][:batch] = timestep

        # Copy in, run (the graph when it was captured for this batch), copy out, wait.
        for name in (self.x_input, self.timestep_input):
            nbytes = host[name][:batch].nbytes
            self.cuda.copy_async(device[name], host[name].ctypes.data, nbytes,
                                 "cudaMemcpyHostToDevice", self.stream)
        self._set_batch(batch)
        if self._graph_exec is not None and batch == self.cuda_graph_batch:
            self.cuda.call("cudaGraphLaunch", self._graph_exec, self.stream)
        else:
            self._execute()
        output = host[self.output_name]
        self.cuda.copy_async(output.ctypes.data, device[self.output_name], output[:batch].nbytes,
                             "cudaMemcpyDeviceToHost", self.stream)
        self.cuda.call("cudaStreamSynchronize", self.stream)
        return output[:batch].astype(np.float32, copy=True)

    def close(self) -> None:
        """Free the graph, the buffers and the stream; a second call does nothing."""
        if not self._resources_open:
            return
        self._resources_open = False
        if self._graph_exec is not None:
            self.cuda.call("cudaGraphExecDestroy", self._graph_exec)
        if self._graph is not None:
            self.cuda.call("cudaGraphDestroy", self._graph)
        self._graph = self._graph_exec = None
        for pointer in self._device_pointers:
            self.cuda.call("cudaFree", pointer)
        self._host = {}
        for pointer in self._host_pointers:
            self.cuda.call("cudaFreeHost", pointer)
        self._device_pointers, self._host_pointers = [], []
        if getattr(self, "stream", None) is not None:
            self.cuda.call("cudaStreamDestroy", self.stream)
            self.stream = None
        # The context must go before the engine, and the engine before the runtime.
        self.context = None
        self.engine = None
        self._runtime = None
