"""The TensorRT and ONNX Runtime CUDA backends.

Tests marked ``gpu`` run the real engines and skip, naming what is missing, on hosts without
them. Without a GPU, the ONNX Runtime IO binding code runs on the CPU provider, and the TensorRT
backend's control flow (buffers, stream, CUDA graph, dtypes, rejections) runs against a small
numpy stand-in for the ``tensorrt`` and cuda-python modules defined below. The stand-in follows
the TensorRT 10 and cuda-python calls that the backend makes; it checks the backend's own logic,
not TensorRT.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibexport.errors import CalibexportError
from calibexport.exporter.engine_cache import (
    ENGINE_FILENAME,
    ENGINE_METADATA_FILENAME,
    BatchProfile,
    EngineKey,
    EngineMetadata,
    EngineMismatch,
    write_engine_metadata,
)
from calibexport.hashing import sha256_file
from calibexport.runtime.backends import tensorrt as tensorrt_backend
from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
from calibexport.runtime.backends.onnxruntime_cuda import (
    IOBindingRunner,
    OnnxRuntimeCudaBackend,
    cuda_provider_options,
    onnxruntime_cuda_unavailable_reason,
)
from calibexport.runtime.backends.tensorrt import (
    TensorRTBackend,
    tensorrt_backend_unavailable_reason,
    timestep_array,
)

TENSORRT_MISSING = tensorrt_backend_unavailable_reason()
ORT_CUDA_MISSING = onnxruntime_cuda_unavailable_reason()
requires_tensorrt = pytest.mark.skipif(
    TENSORRT_MISSING is not None,
    reason=f"needs TensorRT 10+, cuda-python and an NVIDIA GPU: {TENSORRT_MISSING}",
)
requires_ort_cuda = pytest.mark.skipif(
    ORT_CUDA_MISSING is not None, reason=f"needs ONNX Runtime with CUDA: {ORT_CUDA_MISSING}"
)
IMAGE_SHAPE = (1, 4, 4)
ONNX_TYPES = {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32,
              "int64": TensorProto.INT64}


def linear_network(path: Path, timestep_dtype: str = "float32") -> Path:
    """Save eps = 0.5 * x + 0.01 * t (t broadcast per sample) as ONNX and return its path."""
    nodes = [
        helper.make_node("Cast", ["t"], ["t_float"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["t_float", "shape"], ["t_column"]),
        helper.make_node("Mul", ["t_column", "scale_t"], ["t_term"]),
        helper.make_node("Mul", ["x", "scale_x"], ["x_term"]),
        helper.make_node("Add", ["x_term", "t_term"], ["eps"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([-1, 1, 1, 1], dtype=np.int64), "shape"),
        numpy_helper.from_array(np.array(0.01, dtype=np.float32), "scale_t"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "scale_x"),
    ]
    graph = helper.make_graph(
        nodes, "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *IMAGE_SHAPE]),
         helper.make_tensor_value_info("t", ONNX_TYPES[timestep_dtype], ["batch"])],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", *IMAGE_SHAPE])],
        initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def expected_eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return (np.float32(0.5) * x + np.float32(0.01) * t.astype(np.float32).reshape(-1, 1, 1, 1))


def random_inputs(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *IMAGE_SHAPE)).astype(np.float32)


# --- Skip reasons and pure helpers ---------------------------------------------------------


def test_skip_reasons_name_missing_part():
    if TENSORRT_MISSING is not None:
        assert any(word in TENSORRT_MISSING for word in ("tensorrt", "cuda-python", "nvidia-smi",
                                                         "TensorRT"))
    if ORT_CUDA_MISSING is not None:
        assert any(word in ORT_CUDA_MISSING for word in ("CUDAExecutionProvider", "onnxruntime-gpu",
                                                         "nvidia-smi"))


def test_cuda_provider_options_disable_tf32():
    assert cuda_provider_options() == {"device_id": "0", "use_tf32": "0"}
    assert cuda_provider_options(2, tf32=True) == {"device_id": "2", "use_tf32": "1"}
    with pytest.raises(CalibexportError, match="device_id must be >= 0, got -1"):
        cuda_provider_options(-1)


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_timestep_array_integer_dtypes(dtype):
    values = timestep_array(np.array([0.0, 999.0, 500.0]), dtype)
    assert values.dtype == np.dtype(dtype)
    assert values.tolist() == [0, 999, 500]
    assert values.flags["C_CONTIGUOUS"]


def test_timestep_array_rejects_overflow():
    with pytest.raises(CalibexportError, match=r"do not fit the engine's int32 timestep input"):
        timestep_array(np.array([1.0, 2.0**40]), "int32")
    assert timestep_array(np.array([2**40]), "int64").tolist() == [2**40]


def test_timestep_array_rejects_fractions():
    with pytest.raises(CalibexportError, match="takes int64 timesteps but got non-integer"):
        timestep_array(np.array([1.5]), "int64")
    assert timestep_array(np.array([1.5]), "float32").tolist() == [1.5]


def test_backend_modules_import_without_torch():
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import calibexport.runtime.backends.tensorrt\n"
        "import calibexport.runtime.backends.onnxruntime_cuda\n"
        "print('imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout


# --- ONNX Runtime IO binding (CPU provider here, CUDA on GPU hosts) -------------------------


@pytest.mark.parametrize("timestep_dtype", ["float32", "int32", "int64"])
def test_io_binding_matches_session_run(tmp_path, timestep_dtype):
    path = linear_network(tmp_path / "model.onnx", timestep_dtype)
    with OnnxRuntimeBackend(path) as backend:
        runner = IOBindingRunner(backend.session, "x", "t", backend.timestep_dtype, "cpu")
        for batch in (3, 1, 3):
            x = random_inputs(batch, seed=batch)
            t = np.arange(batch).astype(timestep_dtype) * 7
            np.testing.assert_allclose(runner.run(x, t), backend.eps(x, t), rtol=0, atol=0)
            np.testing.assert_allclose(runner.run(x, t), expected_eps(x, t), rtol=1e-6, atol=1e-6)
        assert runner.buffer_count() == 2


def test_io_binding_outputs_are_not_reused(tmp_path):
    path = linear_network(tmp_path / "model.onnx")
    with OnnxRuntimeBackend(path) as backend:
        runner = IOBindingRunner(backend.session, "x", "t", backend.timestep_dtype, "cpu")
        first = runner.run(np.zeros((2, *IMAGE_SHAPE), np.float32), np.array([1.0, 2.0]))
        runner.run(np.ones((2, *IMAGE_SHAPE), np.float32), np.array([3.0, 4.0]))
        np.testing.assert_allclose(first[:, 0, 0, 0], [0.01, 0.02], rtol=1e-6)


@pytest.mark.skipif(ORT_CUDA_MISSING is None, reason="ONNX Runtime with CUDA is present here")
def test_ort_cuda_backend_explains_missing_provider(tmp_path):
    path = linear_network(tmp_path / "model.onnx")
    with pytest.raises(CalibexportError, match="the onnxruntime-cuda backend cannot run: "):
        OnnxRuntimeCudaBackend(path)


# --- TensorRT backend against the numpy stand-in -------------------------------------------


class FakeDataType:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeCudaRuntime:
    """cuda-python's runtime calls, on host memory: a device pointer is a host address."""

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.malloc_calls = 0
        self.capturing = False
        self.captured: list = []
        self.launches = 0
        self.cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeGlobal=0)

    def _allocate(self, nbytes: int) -> int:
        buffer = np.zeros(max(nbytes, 1), dtype=np.uint8)
        self.buffers[buffer.ctypes.data] = buffer
        return buffer.ctypes.data

    def cudaSetDevice(self, device):
        return (0,)

    def cudaGetErrorString(self, error):
        return (0, b"fake error")

    def cudaGetDeviceProperties(self, device):
        return 0, SimpleNamespace(name=b"Fake GPU\x00\x00", major=8, minor=6)

    def cudaMalloc(self, nbytes):
        self.malloc_calls += 1
        return 0, self._allocate(nbytes)

    def cudaMallocHost(self, nbytes):
        return 0, self._allocate(nbytes)

    def cudaFree(self, pointer):
        return (0 if self.buffers.pop(pointer, None) is not None else 1,)

    cudaFreeHost = cudaFree

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaMemcpyAsync(self, destination, source, nbytes, kind, stream):
        ctypes.memmove(destination, source, nbytes)
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = True
        return (0,)

    def cudaStreamEndCapture(self, stream):
        self.capturing = False
        graph, self.captured = self.captured, []
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        return 0, list(graph)

    def cudaGraphLaunch(self, graph_exec, stream):
        self.launches += 1
        for kernel in graph_exec:
            kernel()
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (0,)

    cudaGraphDestroy = cudaGraphExecDestroy


class FakeContext:
    """Computes eps = 0.5 x + 0.01 t from the bound buffers; inside a capture it records."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.executions = 0

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def set_input_shape(self, name, shape):
        low, high = self.engine.batch_range
        if not low <= shape[0] <= high:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def _array(self, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = (ctypes.c_uint8 * nbytes).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)

    def execute_async_v3(self, stream):
        def kernel() -> None:
            self.executions += 1
            x_shape = self.shapes["x"]
            x = self._array("x", x_shape, "float32")
            t = self._array("t", self.shapes["t"], self.engine.timestep_dtype)
            self._array("eps", x_shape, "float32")[...] = expected_eps(x, t)

        if self.engine.cudart.capturing:
            self.engine.cudart.captured.append(kernel)
        else:
            kernel()
        return True


class FakeEngine:
    def __init__(self, cudart: FakeCudaRuntime, timestep_dtype: str,
                 batch_range: tuple[int, int]) -> None:
        self.cudart = cudart
        self.timestep_dtype = timestep_dtype
        self.batch_range = batch_range
        self.contexts: list[FakeContext] = []

    def create_execution_context(self):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def fake_tensorrt(cudart: FakeCudaRuntime) -> SimpleNamespace:
    """A ``tensorrt`` module whose plans are JSON: {"timestep_dtype": ..., "batch_range": ...}."""
    engines: list[FakeEngine] = []

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            try:
                spec = json.loads(bytes(plan))
            except ValueError:
                return None
            engines.append(FakeEngine(cudart, spec["timestep_dtype"], tuple(spec["batch_range"])))
            return engines[-1]

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    return SimpleNamespace(__version__="10.0.0", Logger=Logger, Runtime=Runtime, engines=engines)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Replace tensorrt, cuda-python and the GPU probe with the stand-ins; return cudart."""
    from calibexport.exporter import engine_cache

    cudart = FakeCudaRuntime()
    trt = fake_tensorrt(cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(engine_cache, "import_cuda_runtime", lambda: cudart)
    monkeypatch.setattr(tensorrt_backend, "import_cuda_runtime", lambda: cudart)
    monkeypatch.setattr(tensorrt_backend, "nvidia_gpu_missing_reason", lambda: None)
    cudart.trt = trt
    return cudart


def write_fake_engine(directory: Path, timestep_dtype: str = "int64",
                      profile: BatchProfile = BatchProfile(1, 4, 8), **key_changes) -> Path:
    """Write a stand-in plan and an engine.json that matches the stand-in host."""
    directory.mkdir(parents=True, exist_ok=True)
    plan = json.dumps({"timestep_dtype": timestep_dtype,
                       "batch_range": [profile.min, profile.max]}).encode()
    (directory / ENGINE_FILENAME).write_bytes(plan)
    key = dict(tensorrt_version="10.0.0", gpu_name="Fake GPU", compute_capability="8.6",
               profile=profile, precision="float32", tf32=False, onnx_sha256="a" * 64,
               eta_sha256="b" * 64)
    key.update(key_changes)
    io = {"x": {"mode": "input", "dtype": "float32", "shape": [-1, *IMAGE_SHAPE]},
          "t": {"mode": "input", "dtype": timestep_dtype, "shape": [-1]},
          "eps": {"mode": "output", "dtype": "float32", "shape": [-1, *IMAGE_SHAPE]}}
    write_engine_metadata(directory, EngineMetadata(
        key=EngineKey(**key), plan_sha256=sha256_file(directory / ENGINE_FILENAME),
        plan_bytes=len(plan), io=io, build_seconds=1.0))
    return directory


@pytest.mark.parametrize("timestep_dtype", ["float32", "int32", "int64"])
def test_fake_tensorrt_backend_evaluates(fake_gpu, tmp_path, timestep_dtype):
    engine_dir = write_fake_engine(tmp_path, timestep_dtype)
    with TensorRTBackend(engine_dir) as backend:
        assert backend.image_shape == IMAGE_SHAPE
        assert backend.timestep_dtype == np.dtype(timestep_dtype)
        for batch in (1, 8, 3, 8):
            x = random_inputs(batch, seed=batch)
            t = np.arange(batch, dtype=np.float64) * 100
            np.testing.assert_allclose(backend.eps(x, t), expected_eps(x, t), rtol=1e-6)
        # Three buffers (x, t, eps), allocated once for the largest batch of the profile.
        assert fake_gpu.malloc_calls == 3
    assert fake_gpu.buffers == {}


def test_fake_tensorrt_backend_rejects_batch_outside_profile(fake_gpu, tmp_path):
    engine_dir = write_fake_engine(tmp_path, profile=BatchProfile(2, 4, 8))
    with TensorRTBackend(engine_dir) as backend:
        with pytest.raises(CalibexportError, match=r"batch size 9 is outside .*2\.\.8.*"
                           r"--batch-sizes 2,4,9"):
            backend.eps(random_inputs(9), np.zeros(9))
        with pytest.raises(CalibexportError,
                           match=r"batch size 1 is outside .*--batch-sizes 1,4,8"):
            backend.eps(random_inputs(1), np.zeros(1))
        assert fake_gpu.trt.engines[0].contexts[0].executions == 0


def test_fake_tensorrt_backend_rejects_timestep_overflow(fake_gpu, tmp_path):
    engine_dir = write_fake_engine(tmp_path, timestep_dtype="int32")
    with TensorRTBackend(engine_dir) as backend:
        with pytest.raises(CalibexportError, match="do not fit the engine's int32 timestep input"):
            backend.eps(random_inputs(2), np.array([0.0, 2.0**33]))
        with pytest.raises(CalibexportError, match="non-integer values"):
            backend.eps(random_inputs(2), np.array([0.0, 2.5]))


def test_fake_tensorrt_cuda_graph_replays(fake_gpu, tmp_path):
    engine_dir = write_fake_engine(tmp_path, profile=BatchProfile(1, 4, 8))
    with TensorRTBackend(engine_dir, cuda_graph_batch=4) as backend:
        context = fake_gpu.trt.engines[0].contexts[0]
        # One warm-up execution before the capture; the captured one has not run yet.
        assert context.executions == 1
        for seed in range(3):
            x, t = random_inputs(4, seed), np.array([1.0, 20.0, 300.0, 999.0])
            np.testing.assert_allclose(backend.eps(x, t), expected_eps(x, t), rtol=1e-6)
        assert fake_gpu.launches == 3
        # Another batch size runs without the graph, and the graph still serves batch 4 after.
        x = random_inputs(2)
        np.testing.assert_allclose(backend.eps(x, np.array([5.0, 6.0])),
                                   expected_eps(x, np.array([5.0, 6.0])), rtol=1e-6)
        assert fake_gpu.launches == 3
        x, t = random_inputs(4, seed=9), np.full(4, 7.0)
        np.testing.assert_allclose(backend.eps(x, t), expected_eps(x, t), rtol=1e-6)
        assert fake_gpu.launches == 4


def test_fake_tensorrt_graph_batch_outside_profile(fake_gpu, tmp_path):
    engine_dir = write_fake_engine(tmp_path, profile=BatchProfile(1, 4, 8))
    with pytest.raises(CalibexportError, match="batch size 16 is outside"):
        TensorRTBackend(engine_dir, cuda_graph_batch=16)


def test_fake_tensorrt_rejects_other_gpu_before_loading(fake_gpu, tmp_path):
    engine_dir = write_fake_engine(tmp_path, gpu_name="NVIDIA A100-SXM4-80GB",
                                   compute_capability="8.0")
    with pytest.raises(EngineMismatch, match=r"GPU: engine has 'NVIDIA A100-SXM4-80GB', expected "
                       r"'Fake GPU'; compute capability: engine has '8.0', expected '8.6'"):
        TensorRTBackend(engine_dir)
    assert fake_gpu.trt.engines == []
    assert fake_gpu.malloc_calls == 0


def test_fake_tensorrt_rejects_other_version(fake_gpu, tmp_path):
    engine_dir = write_fake_engine(tmp_path, tensorrt_version="10.7.0")
    with pytest.raises(EngineMismatch, match=r"TensorRT version: engine has '10.7.0', expected "
                       r"'10.0.0'"):
        TensorRTBackend(engine_dir)
    assert fake_gpu.trt.engines == []


def test_fake_tensorrt_rejects_other_onnx_and_eta(fake_gpu, tmp_path):
    engine_dir = write_fake_engine(tmp_path)
    with pytest.raises(EngineMismatch, match=r"ONNX file sha256: .*; eta table sha256: "):
        TensorRTBackend(engine_dir, onnx_sha256="c" * 64, eta_sha256="d" * 64)
    assert fake_gpu.trt.engines == []


def test_fake_tensorrt_unreadable_plan_frees_memory(fake_gpu, tmp_path):
    engine_dir = write_fake_engine(tmp_path)
    plan = engine_dir / ENGINE_FILENAME
    plan.write_bytes(b"not a plan")
    document = json.loads((engine_dir / ENGINE_METADATA_FILENAME).read_text())
    document["plan"]["sha256"] = sha256_file(plan)
    (engine_dir / ENGINE_METADATA_FILENAME).write_text(json.dumps(document))
    with pytest.raises(CalibexportError, match="TensorRT could not deserialize"):
        TensorRTBackend(engine_dir)
    assert fake_gpu.buffers == {}


def test_fake_tensorrt_closed_backend_rejects_calls(fake_gpu, tmp_path):
    backend = TensorRTBackend(write_fake_engine(tmp_path))
    backend.close()
    backend.close()
    with pytest.raises(CalibexportError, match="is closed"):
        backend.eps(random_inputs(1), np.zeros(1))


def test_tensorrt_backend_needs_engine_json(tmp_path):
    with pytest.raises(CalibexportError, match=r"engine.json not found: .* has no TensorRT engine"):
        TensorRTBackend(tmp_path)


# --- GPU: the real engines -----------------------------------------------------------------


@pytest.mark.gpu
@requires_tensorrt
@pytest.mark.parametrize("timestep_dtype", ["float32", "int32", "int64"])
def test_tensorrt_backend_matches_formula(tmp_path, timestep_dtype):
    from calibexport.exporter.tensorrt_engine import EngineBuildOptions, build_engine

    path = linear_network(tmp_path / "model.onnx", timestep_dtype)
    build_engine(path, tmp_path, eta_sha256="e" * 64,
                 options=EngineBuildOptions(profile=BatchProfile(1, 4, 8)))
    with TensorRTBackend(tmp_path) as backend:
        assert backend.timestep_dtype == np.dtype(timestep_dtype)
        for batch in (1, 5, 8):
            x, t = random_inputs(batch, batch), np.arange(batch, dtype=np.float64) * 111
            np.testing.assert_allclose(backend.eps(x, t), expected_eps(x, t), rtol=1e-5,
                                       atol=1e-6)
        with pytest.raises(CalibexportError, match="batch size 9 is outside"):
            backend.eps(random_inputs(9), np.zeros(9))


@pytest.mark.gpu
@requires_tensorrt
def test_tensorrt_cuda_graph_matches_plain(tiny_artifact):
    with TensorRTBackend.from_artifact(tiny_artifact) as plain:
        shape = plain.image_shape
        x = np.random.default_rng(0).standard_normal((4, *shape)).astype(np.float32)
        t = np.array([0.0, 10.0, 50.0, 99.0])
        expected = plain.eps(x, t)
    with TensorRTBackend.from_artifact(tiny_artifact, cuda_graph_batch=4) as graphed:
        np.testing.assert_array_equal(graphed.eps(x, t), expected)
        np.testing.assert_array_equal(graphed.eps(x, t), expected)


@pytest.mark.gpu
@requires_tensorrt
def test_tensorrt_engine_from_other_gpu_rejected(tiny_artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    path = copy / ENGINE_METADATA_FILENAME
    document = json.loads(path.read_text())
    document["gpu"]["name"] = "Another GPU"
    document["gpu"]["compute_capability"] = "5.0"
    path.write_text(json.dumps(document))
    with pytest.raises(EngineMismatch, match=r"GPU: engine has 'Another GPU'"):
        TensorRTBackend.from_artifact(copy)


@pytest.mark.gpu
@requires_tensorrt
def test_sampler_tensorrt_matches_onnxruntime(tiny_artifact):
    from calibexport.runtime.sampler import Sampler

    with Sampler.from_artifact(tiny_artifact, backend="tensorrt") as sampler:
        images = sampler.sample(4, steps=6, order=2, method="multistep", seed=0)
    with Sampler.from_artifact(tiny_artifact) as sampler:
        reference = sampler.sample(4, steps=6, order=2, method="multistep", seed=0)
    np.testing.assert_allclose(images, reference, atol=5e-3, rtol=5e-3)


@pytest.mark.gpu
@requires_ort_cuda
@pytest.mark.parametrize("timestep_dtype", ["float32", "int32", "int64"])
def test_ort_cuda_matches_cpu(tmp_path, timestep_dtype):
    path = linear_network(tmp_path / "model.onnx", timestep_dtype)
    with OnnxRuntimeCudaBackend(path) as gpu, OnnxRuntimeBackend(path) as cpu:
        assert gpu.tf32 is False
        for batch in (2, 7, 2):
            x, t = random_inputs(batch, batch), np.arange(batch, dtype=np.float64) * 3
            np.testing.assert_allclose(gpu.eps(x, t), cpu.eps(x, t), rtol=1e-6, atol=1e-6)
        assert gpu.runner.buffer_count() == 2


@pytest.mark.gpu
@requires_ort_cuda
def test_ort_cuda_tf32_on_request(tmp_path):
    path = linear_network(tmp_path / "model.onnx")
    with OnnxRuntimeCudaBackend(path, tf32=True) as gpu:
        assert gpu.tf32 is True


@pytest.mark.gpu
@requires_ort_cuda
def test_sampler_ort_cuda_matches_cpu(tiny_artifact):
    from calibexport.runtime.sampler import Sampler

    with Sampler.from_artifact(tiny_artifact, backend="onnxruntime-cuda") as sampler:
        images = sampler.sample(4, steps=6, order=2, method="multistep", seed=0)
    with Sampler.from_artifact(tiny_artifact) as sampler:
        reference = sampler.sample(4, steps=6, order=2, method="multistep", seed=0)
    np.testing.assert_allclose(images, reference, atol=5e-3, rtol=5e-3)


# --- Sampler.from_artifact -----------------------------------------------------------------


@pytest.mark.skipif(TENSORRT_MISSING is None, reason="TensorRT and a GPU are present here")
def test_sampler_tensorrt_without_engine_explains(tiny_artifact):
    from calibexport.runtime.sampler import Sampler

    with pytest.raises(CalibexportError, match=r"engine.json not found: .* has no TensorRT "
                       r"engine. Build one on a GPU host"):
        Sampler.from_artifact(tiny_artifact, backend="tensorrt")


@pytest.mark.skipif(ORT_CUDA_MISSING is None, reason="ONNX Runtime with CUDA is present here")
def test_sampler_ort_cuda_without_provider_explains(tiny_artifact):
    from calibexport.runtime.sampler import Sampler

    with pytest.raises(CalibexportError, match="the onnxruntime-cuda backend cannot run: "):
        Sampler.from_artifact(tiny_artifact, backend="onnxruntime-cuda")


def test_sampler_lists_gpu_backends(tiny_artifact):
    from calibexport.runtime.sampler import Sampler

    with pytest.raises(CalibexportError, match="valid backends: onnxruntime, onnxruntime-cuda, "
                       "tensorrt"):
        Sampler.from_artifact(tiny_artifact, backend="cuda")


def install_fake_engine(source_artifact: Path, tmp_path: Path) -> Path:
    """Copy an artifact and give it a stand-in engine that matches its ONNX file and eta."""
    import shutil

    from calibexport.runtime.artifact import load_manifest

    artifact = tmp_path / "artifact"
    shutil.copytree(source_artifact, artifact)
    manifest = load_manifest(artifact)
    engine_dir = write_fake_engine(tmp_path / "engine", timestep_dtype="float32",
                                   onnx_sha256=manifest.files["model.onnx"],
                                   eta_sha256=manifest.raw["eta"]["values_sha256"])
    for name in (ENGINE_FILENAME, ENGINE_METADATA_FILENAME):
        shutil.copy(engine_dir / name, artifact / name)
    document = json.loads((artifact / ENGINE_METADATA_FILENAME).read_text())
    document["io"]["x"]["shape"] = [-1, *manifest.image_shape]
    document["io"]["eps"]["shape"] = [-1, *manifest.image_shape]
    (artifact / ENGINE_METADATA_FILENAME).write_text(json.dumps(document))
    return artifact


def test_sampler_tensorrt_with_fake_engine(fake_gpu, tiny_artifact, tmp_path):
    """The sampler drives the TensorRT backend through a whole run (numpy stand-in engine)."""
    from calibexport.runtime.artifact import load_manifest
    from calibexport.runtime.sampler import Sampler

    artifact = install_fake_engine(tiny_artifact, tmp_path)
    manifest = load_manifest(artifact)
    with Sampler.from_artifact(artifact, backend="tensorrt", cuda_graph_batch=2) as sampler:
        images = sampler.sample(3, steps=4, order=1, method="multistep", seed=0, batch_size=2)
    assert images.shape == (3, *manifest.image_shape)
    assert np.all(np.isfinite(images))
    assert fake_gpu.launches > 0


# --- The GPU check script and benchmark ----------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_gpu_check_script_writes_summary(tmp_path):
    """Run the whole script with a stand-in nvidia-smi and a 2 s benchmark limit."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'Stand-in GPU, 8.6, 550.00, 81920 MiB'\n")
    fake.chmod(0o755)
    environment = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                       GPU_CHECK_BENCHMARK_SECONDS="2")
    out = tmp_path / "results"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
                            capture_output=True, text=True, timeout=400, env=environment)
    assert result.returncode == 1
    assert "benchmark exit status 124" in result.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["gpu"] == "Stand-in GPU, 8.6, 550.00, 81920 MiB"
    assert summary["timed_out"] == ["benchmark"]
    assert summary["tests"]["failed"] == []
    assert summary["tests"]["total"] > 0
    if TENSORRT_MISSING is not None:
        assert any("needs TensorRT 10+" in reason for reason in summary["tests"]["skipped"])
    assert (out / "gpu-tests.log").is_file()


@pytest.mark.slow
def test_gpu_benchmark_dry_run(tmp_path):
    out = tmp_path / "benchmark.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_benchmark.py"), "--dry-run",
               "--architecture", "tiny", "--batch-size", "2", "--num-samples", "3", "--steps",
               "2", "--repeats", "2", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert results["status"] == "complete"
    assert results["build"]["onnx_bytes"] > 0
    assert "engine_seconds" not in results["build"]
    for name in ("tensorrt", "tensorrt-cuda-graph", "onnxruntime-cuda"):
        assert results["backends"][name] == {"skipped": "--dry-run"}
    onnxruntime = results["backends"]["onnxruntime-cpu"]
    assert onnxruntime["samples_finite"] is True
    assert onnxruntime["eval_ms_median"] > 0
    assert onnxruntime["max_abs_diff_vs_pytorch"] < 1e-4
    assert results["backends"]["pytorch-eager-cpu"]["sampling_images_per_second"] > 0


def test_gpu_benchmark_rejects_bad_sizes(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_benchmark.py"), "--dry-run",
               "--batch-size", "0", "--out", str(tmp_path / "b.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--batch-size must be >= 1, got 0" in result.stderr
    assert not (tmp_path / "b.json").exists()


# --- validate --backend tensorrt -----------------------------------------------------------


def test_tensorrt_validation_reports_with_fake_engine(fake_gpu, tiny_artifact, tmp_path):
    """The stand-in engine computes 0.5 x + 0.01 t, not the model, so every report fails."""
    from calibexport.exporter.tensorrt_engine import validate_tensorrt_artifact
    from calibexport.validate.run import ValidateOptions

    artifact = install_fake_engine(tiny_artifact, tmp_path)
    options = ValidateOptions(runs="multistep:2:4", max_rows=8, num_samples=1)
    validation = validate_tensorrt_artifact(artifact, options=options,
                                            report_dir=tmp_path / "reports")
    assert not validation.passed
    assert set(validation.reports) == {"pytorch", "onnxruntime"}
    for name, report in validation.reports.items():
        directory = tmp_path / "reports" / f"tensorrt-vs-{name}"
        assert validation.directories[name] == directory
        assert report["status"] == "FAILED"
        assert report["tolerances"]["preset"] == "fp32-gpu"
        assert report["subject"]["deployed"].startswith("TensorRT 10.0.0 model.plan on Fake GPU")
        assert report["environment"]["tf32"] is False
        assert json.loads((directory / "parity.json").read_text())["status"] == "FAILED"
        assert (directory / "parity.xml").is_file()
        reproduce = report["reproduce"]
        assert Path(reproduce["inputs"]).parent == directory / "polygraphy"
        assert reproduce["num_iterations"] == 4
        assert " --trt --strongly-typed " in reproduce["command"]
        assert reproduce["command"] in (directory / "parity.md").read_text()
    markdown = validation.markdown()
    assert "PyTorch eager float32 on the CPU" in markdown
    assert "ONNX Runtime CPUExecutionProvider" in markdown


@pytest.mark.skipif(TENSORRT_MISSING is None, reason="TensorRT and a GPU are present here")
def test_validate_cli_tensorrt_without_engine(tiny_artifact):
    from typer.testing import CliRunner

    import calibexport.cli.validate  # noqa: F401  (registers the command)
    from calibexport.cli.app import app

    result = CliRunner().invoke(app, ["validate", "--artifact", str(tiny_artifact),
                                      "--backend", "tensorrt"])
    assert result.exit_code == 2
    assert "engine.json not found" in result.output
    assert "Traceback" not in result.output


def test_validate_cli_rejects_unknown_backend(tiny_artifact):
    from typer.testing import CliRunner

    import calibexport.cli.validate  # noqa: F401  (registers the command)
    from calibexport.cli.app import app

    result = CliRunner().invoke(app, ["validate", "--artifact", str(tiny_artifact),
                                      "--backend", "openvino"])
    assert result.exit_code == 2
    assert "unknown backend 'openvino'; valid backends: onnxruntime, tensorrt." in result.output


@pytest.mark.parametrize("changes, flag", [
    ({"provider": "cuda"}, "--provider cuda"),
    ({"tf32": True, "provider": "cuda"}, "--provider cuda, --tf32"),
    ({"save_inputs": Path("inputs")}, "--save-inputs"),
])
def test_tensorrt_validation_rejects_onnxruntime_flags(tiny_artifact, changes, flag):
    from calibexport.exporter.tensorrt_engine import validate_tensorrt_artifact
    from calibexport.validate.run import ValidateOptions

    with pytest.raises(CalibexportError, match=f"{flag} cannot be combined with --backend "
                       "tensorrt"):
        validate_tensorrt_artifact(tiny_artifact, options=ValidateOptions(**changes))


@pytest.mark.gpu
@requires_tensorrt
def test_tensorrt_validation_passes(tiny_artifact, tmp_path):
    from calibexport.exporter.tensorrt_engine import validate_tensorrt_artifact
    from calibexport.validate.run import ValidateOptions

    validation = validate_tensorrt_artifact(tiny_artifact, options=ValidateOptions(runs="quick"),
                                            report_dir=tmp_path)
    failed = {name: report["summary"]["failed_checks"]
              for name, report in validation.reports.items()}
    assert failed == {"pytorch": [], "onnxruntime": []}
    assert validation.passed
