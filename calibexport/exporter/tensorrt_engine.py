"""TensorRT engine builds on GPU hosts (TensorRT 10+ Python API, imported lazily).

The network is parsed from the calibrated ``model.onnx`` as a strongly typed network, so each
layer runs in the type the ONNX graph gives it. An fp32 graph gives an fp32 engine. An fp16 graph
that keeps normalization and the eta subtraction in fp32 keeps them in fp32 in the engine too.
TF32 is off unless requested, so fp32 layers compute like PyTorch's default. The engine is
written as ``model.plan`` with ``engine.json`` (see ``engine_cache``) and the TensorRT timing
cache ``timing.cache`` next to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.exporter.atomic import atomic_write_bytes
from calibexport.exporter.engine_cache import (
    DEFAULT_BATCH_SIZES,
    ENGINE_FILENAME,
    ENGINE_METADATA_FILENAME,
    TIMING_CACHE_FILENAME,
    BatchProfile,
    EngineCache,
    EngineKey,
    EngineMetadata,
    current_host_facts,
    read_engine_metadata,
    write_engine_metadata,
)
from calibexport.hashing import sha256_file
from calibexport.runtime.backends.base import EpsBackend
from calibexport.runtime.backends.tensorrt import tensorrt_dtype_name, tensorrt_missing_reason

if TYPE_CHECKING:
    from calibexport.runtime.schedule import VPSchedule
    from calibexport.validate.parity import ParityConfig, ParityResult

logger = logging.getLogger(__name__)

# ONNX element types (TensorProto.DataType values) and their names in engine.json.
_FLOAT_NAMES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
# Input and output types that TensorRT 10 cannot bind: double, uint16/32/64, string, complex.
_UNSUPPORTED_IO = {11: "float64", 4: "uint16", 12: "uint32", 13: "uint64", 8: "string",
                   14: "complex64", 15: "complex128"}


def tensorrt_unavailable_reason() -> str | None:
    """Return why no engine can be built here, or None when TensorRT 10+ and a GPU are present."""
    return tensorrt_missing_reason()


@dataclass(frozen=True)
class EngineBuildOptions:
    """How to build an engine: batch range, TF32, workspace limit, device and cache."""

    profile: BatchProfile = BatchProfile.parse(DEFAULT_BATCH_SIZES)
    tf32: bool = False
    #: Limit of the builder's workspace memory pool in bytes; None leaves TensorRT's default.
    workspace_bytes: int | None = None
    device: int = 0
    #: An EngineCache root: an engine with the same key is copied from there instead of built.
    cache_dir: Path | None = None


def onnx_precision(model: Any) -> str:
    """Return the floating-point types of an ONNX graph joined by ``+``, e.g. ``float16+float32``.

    Counts graph inputs and outputs, initializers, Constant values and Cast targets.
    """
    graph = model.graph
    types = {value.type.tensor_type.elem_type for value in (*graph.input, *graph.output)}
    types |= {tensor.data_type for tensor in graph.initializer}
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to":
                types.add(attribute.i)
            elif node.op_type == "Constant" and attribute.name == "value":
                types.add(attribute.t.data_type)
    names = sorted(_FLOAT_NAMES[t] for t in types if t in _FLOAT_NAMES)
    return "+".join(names) or "none"


def tensorrt_incompatibilities(model: Any) -> list[str]:
    """Name each input, output or Cast of an ONNX graph that a TensorRT 10 engine cannot hold."""
    problems = []
    graph = model.graph
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            elem_type = value.type.tensor_type.elem_type
            if elem_type in _UNSUPPORTED_IO:
                problems.append(f"{kind} {value.name!r} has type {_UNSUPPORTED_IO[elem_type]}")
    for node in graph.node:
        if node.op_type != "Cast":
            continue
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == 11:
                problems.append(f"Cast node {node.name or '(unnamed)'!r} makes tensor "
                                f"{node.output[0]!r} float64")
    return problems


def batch_input_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Return each graph input's shape with -1 for its dynamic batch axis 0.

    Raises CalibexportError naming the input when axis 0 is static or another axis is dynamic,
    because one TensorRT profile then cannot cover a batch range.
    """
    initializers = {tensor.name for tensor in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            batch = dims[0].dim_value if dims else "none"
            raise CalibexportError(
                f"input {value.name!r} of the ONNX graph has a static batch axis ({batch}); "
                "re-export it with a dynamic batch axis, because a TensorRT profile needs one."
            )
        rest = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        if None in rest:
            raise CalibexportError(
                f"input {value.name!r} of the ONNX graph has dynamic axes beyond the batch "
                f"axis ({[d.dim_param or d.dim_value for d in dims]}); only axis 0 may be dynamic."
            )
        shapes[value.name] = (-1, *rest)
    return shapes


def _parser_failure(parser: Any, onnx_path: Path) -> CalibexportError:
    """Describe every ONNX parser error with the node and operator it names."""
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = getattr(error, "node_name", lambda: "")() or f"#{error.node()}"
        operator = getattr(error, "node_operator", lambda: "")()
        errors.append(f"node {node} ({operator or 'unknown operator'}): {error.desc()}")
    return CalibexportError(
        f"TensorRT could not parse {onnx_path}: {'; '.join(errors) or 'no error was reported'}. "
        "Build without an engine (--no-engine) or change the network so TensorRT supports it."
    )


def _build_plan(trt: Any, onnx_path: Path, shapes: dict[str, tuple[int, ...]],
                options: EngineBuildOptions, timing_cache: bytes) -> tuple[bytes, bytes]:
    """Parse ``onnx_path`` as a strongly typed network and build it; return (plan, timing cache)."""
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise _parser_failure(parser, onnx_path)

    config = builder.create_builder_config()
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_bytes))
    profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        profile.set_shape(name, *options.profile.shapes(shape))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise CalibexportError(
            f"TensorRT could not build an engine from {onnx_path} with batch sizes "
            f"{options.profile.text()} (see the TensorRT log above); try a smaller batch range "
            "or a larger workspace."
        )
    return bytes(memoryview(plan)), bytes(memoryview(config.get_timing_cache().serialize()))


def _engine_io(trt: Any, plan: bytes) -> dict[str, dict[str, Any]]:
    """Deserialize ``plan`` once (which proves it loads) and describe its I/O tensors."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise CalibexportError("TensorRT could not deserialize the engine it has just built.")
    io = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        io[name] = {"mode": mode, "dtype": tensorrt_dtype_name(engine.get_tensor_dtype(name)),
                    "shape": [int(d) for d in engine.get_tensor_shape(name)]}
    return io


def _import_tensorrt() -> Any:
    reason = tensorrt_missing_reason()
    if reason:
        raise CalibexportError(f"cannot build a TensorRT engine: {reason}.")
    import tensorrt

    return tensorrt


@dataclass(frozen=True)
class OnnxForTensorRT:
    """The facts about an ONNX file that an engine build needs."""

    path: Path
    sha256: str
    precision: str
    #: Input name -> shape with -1 for the batch axis.
    input_shapes: dict[str, tuple[int, ...]]


def inspect_onnx(onnx_path: str | Path) -> OnnxForTensorRT:
    """Read the precision and input shapes of ``onnx_path``, rejecting what TensorRT cannot build.

    Raises CalibexportError naming each tensor of an unsupported type, and each input whose batch
    axis is static or whose other axes are dynamic.
    """
    import onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CalibexportError(f"ONNX model not found: {onnx_path}.")
    model = onnx.load(str(onnx_path), load_external_data=False)
    problems = tensorrt_incompatibilities(model)
    if problems:
        raise CalibexportError(
            f"{onnx_path} cannot become a TensorRT engine: {'; '.join(problems)}. Export the "
            "network with float32 or int32/int64 tensors, or build with --no-engine."
        )
    return OnnxForTensorRT(path=onnx_path, sha256=sha256_file(onnx_path),
                           precision=onnx_precision(model), input_shapes=batch_input_shapes(model))


def build_engine(onnx_path: str | Path, out_dir: str | Path, *, eta_sha256: str,
                 options: EngineBuildOptions = EngineBuildOptions()) -> EngineMetadata:
    """Build ``out_dir/model.plan`` from ``onnx_path``, with ``engine.json`` and ``timing.cache``.

    With ``options.cache_dir``, an engine cached under the same key is copied instead of built,
    and a new engine is stored there. The timing cache starts from ``out_dir/timing.cache`` or,
    when that is absent, the cache's shared one for this TensorRT version and GPU.
    """
    out_dir = Path(out_dir)
    onnx_info = inspect_onnx(onnx_path)
    trt = _import_tensorrt()
    host = current_host_facts(trt.__version__, options.device)
    key = EngineKey(tensorrt_version=host.tensorrt_version, gpu_name=host.gpu_name,
                    compute_capability=host.compute_capability, profile=options.profile,
                    precision=onnx_info.precision, tf32=options.tf32,
                    onnx_sha256=onnx_info.sha256, eta_sha256=eta_sha256)
    cache = EngineCache(options.cache_dir) if options.cache_dir else None
    shared_timing = cache.timing_cache_path(key) if cache else None
    entry = cache.lookup(key) if cache else None
    if entry is not None:
        for name in (ENGINE_FILENAME, ENGINE_METADATA_FILENAME):
            atomic_write_bytes(out_dir / name, (entry / name).read_bytes())
        if shared_timing is not None and shared_timing.is_file():
            atomic_write_bytes(out_dir / TIMING_CACHE_FILENAME, shared_timing.read_bytes())
        return read_engine_metadata(out_dir)

    timing_path = out_dir / TIMING_CACHE_FILENAME
    timing = b""
    for candidate in (timing_path, shared_timing):
        if candidate is not None and candidate.is_file():
            timing = candidate.read_bytes()
            break
    logger.info("Building TensorRT engine from %s (TensorRT %s, %s sm %s, batch sizes %s, "
                "precision %s, TF32 %s) ...", onnx_info.path, key.tensorrt_version, key.gpu_name,
                key.compute_capability, key.profile.text(), key.precision,
                "on" if key.tf32 else "off")
    start = time.perf_counter()
    plan, timing = _build_plan(trt, onnx_info.path, onnx_info.input_shapes, options, timing)
    seconds = time.perf_counter() - start

    atomic_write_bytes(out_dir / ENGINE_FILENAME, plan)
    atomic_write_bytes(timing_path, timing)
    metadata = EngineMetadata(key=key, plan_sha256=sha256_file(out_dir / ENGINE_FILENAME),
                              plan_bytes=len(plan), io=_engine_io(trt, plan), build_seconds=seconds)
    write_engine_metadata(out_dir, metadata)
    if cache:
        cache.store(key, out_dir)
        atomic_write_bytes(shared_timing, timing)
    logger.info("Built %s (%.1f MiB) in %.1fs. Done.", out_dir / ENGINE_FILENAME,
                len(plan) / 2**20, seconds)
    return metadata


def build_artifact_engine(artifact_dir: str | Path,
                          options: EngineBuildOptions = EngineBuildOptions()) -> EngineMetadata:
    """Build the engine of an artifact directory from its ``model.onnx`` and manifest."""
    from calibexport.runtime.artifact import load_manifest

    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    eta_sha256 = (manifest.raw.get("eta") or {}).get("values_sha256")
    if not eta_sha256:
        raise CalibexportError(f"{artifact_dir / 'manifest.json'} records no eta digest; rebuild "
                               "the artifact with `calibexport build`.")
    return build_engine(artifact_dir / "model.onnx", artifact_dir, eta_sha256=eta_sha256,
                        options=options)


class RecordingBackend(EpsBackend):
    """Pass evaluations to ``inner`` and hand each (x, timestep, eps) to ``matches``."""

    def __init__(self, inner: EpsBackend, matches: MatchedEvaluations, side: str) -> None:
        self.inner, self.matches, self.side = inner, matches, side
        self.name = inner.name
        self.image_shape = inner.image_shape
        self.timestep_dtype = inner.timestep_dtype

    def _eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        eps = self.inner.eps(x, timestep)
        self.matches.add(self.side, x, timestep, eps)
        return eps


class MatchedEvaluations:
    """Pair deployed and reference evaluations of identical inputs and keep the worst ones.

    An evaluation is kept as (max abs error, x, timestep, reference eps); NaN or Inf in either
    output counts as an infinite error. Unpaired evaluations wait for their partner.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.worst: list[tuple[float, np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending: dict[bytes, tuple[str, np.ndarray]] = {}

    def add(self, side: str, x: np.ndarray, timestep: np.ndarray, eps: np.ndarray) -> None:
        digest = hashlib.sha256(x.tobytes() + timestep.tobytes() + timestep.dtype.str.encode())
        key = digest.digest()
        partner = self._pending.get(key)
        if partner is None or partner[0] == side:
            self._pending[key] = (side, eps)
            return
        del self._pending[key]
        reference = eps if side == "reference" else partner[1]
        difference = np.abs(eps.astype(np.float64) - partner[1])
        error = float(difference.max()) if np.all(np.isfinite(difference)) else float("inf")
        self.worst.append((error, x.copy(), timestep.copy(), reference.copy()))
        self.worst.sort(key=lambda item: -item[0])
        del self.worst[self.keep:]


def _polygraphy_trt_command(model_path: Path, inputs: Path, outputs: Path, *, x_input: str,
                            timestep_input: str, image_shape: tuple[int, ...],
                            profile: BatchProfile, atol: float, rtol: float) -> str:
    """Return the ``polygraphy run`` command that builds a strongly typed engine with ``profile``
    and compares it with the saved reference outputs."""
    image = ",".join(str(d) for d in image_shape)
    command = ["polygraphy", "run", str(model_path), "--trt", "--strongly-typed"]
    for bound, batch in (("min", profile.min), ("opt", profile.opt), ("max", profile.max)):
        command += [f"--trt-{bound}-shapes", f"{x_input}:[{batch},{image}]",
                    f"{timestep_input}:[{batch}]"]
    command += ["--load-inputs", str(inputs), "--load-outputs", str(outputs),
                "--atol", f"{atol:g}", "--rtol", f"{rtol:g}"]
    return shlex.join(command)


def save_polygraphy_repro(directory: str | Path, matches: MatchedEvaluations, *, x_input: str,
                          timestep_input: str, output_name: str, atol: float, rtol: float,
                          model_path: Path = Path("model.onnx"),
                          profile: BatchProfile | None = None) -> dict[str, Any]:
    """Write the worst evaluations as Polygraphy JSON: inputs.json, outputs.json, iterations.json.

    ``outputs.json`` holds the reference outputs of the runner ``reference``. Returns the paths,
    the number of iterations and the ``polygraphy run --trt`` command that compares TensorRT with
    the reference on exactly these inputs, as the parity report's ``reproduce`` entry.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{name}.json" for name in ("inputs", "outputs", "iterations")}
    # Polygraphy logs to stdout, where validate prints the parity summary.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        from polygraphy.comparator import RunResults
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.json import save_json

        feeds = [{x_input: x, timestep_input: t} for _, x, t, _ in matches.worst]
        save_json(feeds, str(paths["inputs"]), description="calibexport parity inputs")
        results = RunResults()
        results.append(("reference", [IterationResult({output_name: eps}, runner_name="reference")
                                      for _, _, _, eps in matches.worst]))
        results.save(str(paths["outputs"]))
    for line in captured.getvalue().splitlines():
        logger.debug("polygraphy: %s", line)
    iterations = [{"iteration": number, "max_abs_error": error,
                   "timesteps": t.astype(np.float64).tolist()}
                  for number, (error, _, t, _) in enumerate(matches.worst)]
    paths["iterations"].write_text(json.dumps(iterations, indent=1) + "\n")

    batches = [len(t) for _, _, t, _ in matches.worst] or [1]
    image_shape = tuple(matches.worst[0][1].shape[1:]) if matches.worst else ()
    command = _polygraphy_trt_command(
        model_path, paths["inputs"], paths["outputs"], x_input=x_input,
        timestep_input=timestep_input, image_shape=image_shape,
        profile=profile or BatchProfile(min(batches), max(batches), max(batches)),
        atol=atol, rtol=rtol)
    logger.info("Saved %d Polygraphy iterations with the largest errors in %s.", len(feeds),
                directory)
    return {"directory": str(directory), **{name: str(path) for name, path in paths.items()},
            "num_iterations": len(feeds), "runner_name": "reference", "command": command}


def validate_tensorrt(deployed: EpsBackend, reference: EpsBackend, schedule: VPSchedule,
                      num_timesteps: int, config: ParityConfig, *, repro_dir: Path | None = None,
                      repro_evaluations: int = 4, model_path: Path = Path("model.onnx")
                      ) -> tuple[ParityResult, dict[str, Any] | None]:
    """Run the parity checks of ``deployed`` (a TensorRT backend) against ``reference``.

    With ``repro_dir``, the ``repro_evaluations`` evaluations that differ most are saved as
    Polygraphy JSON (see ``save_polygraphy_repro``). Returns the result and the saved files'
    ``reproduce`` entry (None without ``repro_dir``).
    """
    from calibexport.validate.parity import run_parity

    matches = MatchedEvaluations(repro_evaluations)
    result = run_parity(RecordingBackend(deployed, matches, "deployed"),
                        RecordingBackend(reference, matches, "reference"), schedule,
                        num_timesteps, config)
    if repro_dir is None:
        return result, None
    tolerance = config.tolerances["evaluation"]
    reproduce = save_polygraphy_repro(
        repro_dir, matches, x_input=getattr(deployed, "x_input", "x"),
        timestep_input=getattr(deployed, "timestep_input", "t"),
        output_name=getattr(deployed, "output_name", "eps"), atol=tolerance.atol,
        rtol=tolerance.rtol, model_path=model_path, profile=getattr(deployed, "profile", None))
    return result, reproduce


def build_engine_step(artifact_dir: str | Path, *, enabled: bool = True,
                      batch_sizes: str | None = None,
                      cache_dir: Path | None = None) -> EngineMetadata | None:
    """Run the engine step of ``calibexport build``: build the engine when TensorRT and a GPU are
    present, else log one line saying why not. Returns the engine metadata or None."""
    if not enabled:
        logger.info("TensorRT engine skipped (--no-engine). The ONNX artifact is complete.")
        return None
    profile = BatchProfile.parse(batch_sizes or DEFAULT_BATCH_SIZES)
    reason = tensorrt_unavailable_reason()
    if reason:
        logger.info("TensorRT engine skipped: %s. The ONNX artifact is complete.", reason)
        if batch_sizes:
            logger.warning("--batch-sizes %s has no effect because no engine is built.",
                           batch_sizes)
        return None
    return build_artifact_engine(artifact_dir, EngineBuildOptions(profile=profile,
                                                                  cache_dir=cache_dir))


@dataclass
class TensorRTValidation:
    """The parity reports of ``model.plan`` against each reference, by reference name."""

    reports: dict[str, dict[str, Any]]
    directories: dict[str, Path]

    @property
    def passed(self) -> bool:
        return all(report["status"] == "PASSED" for report in self.reports.values())

    def markdown(self) -> str:
        """Return the parity.md of every reference, one after the other."""
        return "\n".join((directory / "parity.md").read_text()
                         for directory in self.directories.values())


def _check_tensorrt_validate_options(options: Any) -> None:
    unsupported = [flag for flag, used in (
        ("--reference", options.reference is not None),
        ("--save-reference", options.save_reference is not None),
        ("--save-inputs", options.save_inputs is not None),
        ("--provider cuda", options.provider != "cpu"), ("--tf32", options.tf32)) if used]
    if unsupported:
        raise CalibexportError(
            f"{', '.join(unsupported)} cannot be combined with --backend tensorrt, which compares "
            "model.plan with PyTorch and ONNX Runtime on the CPU and always saves Polygraphy "
            f"files; drop {' and '.join(unsupported)}."
        )


def validate_tensorrt_artifact(artifact_dir: str | Path, *, loaded: Any = None,
                               options: Any = None, report_dir: Path | None = None,
                               cuda_graph_batch: int | None = None) -> TensorRTValidation:
    """Validate an artifact's ``model.plan`` against PyTorch and against ONNX Runtime (CPU).

    ``options`` is a ``calibexport.validate.run.ValidateOptions`` (tolerances, runs, seed); its
    ``auto`` preset means ``fp16`` for an engine with float16 layers, else ``fp32-gpu``. Each
    reference gets parity.json, parity.md and parity.xml in ``REPORT_DIR/tensorrt-vs-NAME``,
    and the Polygraphy files of its worst evaluations in ``polygraphy/`` below that.
    """
    from calibexport.runtime.artifact import load_manifest, verify_artifact_files
    from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from calibexport.runtime.backends.tensorrt import TensorRTBackend
    from calibexport.runtime.eta_table import load_eta_table
    from calibexport.runtime.schedule import schedule_from_spec
    from calibexport.validate.run import (
        ValidateOptions,
        _load_torch_reference,
        _parity_config,
        check_options,
    )
    from calibexport.validate.torch_reference import TorchCalibratedBackend

    options = options or ValidateOptions()
    _check_tensorrt_validate_options(options)
    check_options(options)
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    verify_artifact_files(artifact_dir, manifest)
    table = load_eta_table(artifact_dir)
    schedule = schedule_from_spec(manifest.schedule)
    validation = TensorRTValidation({}, {})
    with TensorRTBackend.from_artifact(artifact_dir, cuda_graph_batch=cuda_graph_batch) as deployed:
        # The engine is opened first, so a missing or mismatched engine fails before the model load.
        loaded = _load_torch_reference(artifact_dir, manifest, loaded)
        key = deployed.metadata.key
        preset = options.tolerance_preset
        if preset == "auto":
            preset = "fp16" if "float16" in key.precision else "fp32-gpu"
        config = _parity_config(options, preset)
        references = {
            "pytorch": (lambda: TorchCalibratedBackend(loaded.module, table, deployed.image_shape,
                                                       deployed.timestep_dtype),
                        "PyTorch eager float32 on the CPU: network(x, t) - eta(t)"),
            "onnxruntime": (lambda: OnnxRuntimeBackend(artifact_dir / "model.onnx"),
                            "ONNX Runtime CPUExecutionProvider, model.onnx"),
        }
        for name, (open_reference, description) in references.items():
            directory = Path(report_dir or artifact_dir) / f"tensorrt-vs-{name}"
            with open_reference() as reference:
                result, reproduce = validate_tensorrt(
                    deployed, reference, schedule, manifest.num_timesteps, config,
                    repro_dir=directory / "polygraphy", model_path=artifact_dir / "model.onnx")
            validation.reports[name] = _write_tensorrt_report(
                result, reproduce, directory, deployed, description, config, preset,
                {"artifact": str(artifact_dir), "eta_sha256": table.sha256,
                 "weights_sha256": manifest.weights_sha256})
            validation.directories[name] = directory
    return validation


def _write_tensorrt_report(result: ParityResult, reproduce: dict[str, Any] | None,
                           directory: Path, deployed: Any, reference: str, config: ParityConfig,
                           preset: str, facts: dict[str, Any]) -> dict[str, Any]:
    """Write the parity reports of one TensorRT comparison; return the parity.json document."""
    import platform

    from calibexport.validate.reports import parity_to_dict, write_reports

    key = deployed.metadata.key
    result.environment = {
        "python": platform.python_version(), "platform": platform.platform(),
        "tensorrt": key.tensorrt_version, "gpu": key.gpu_name,
        "compute_capability": key.compute_capability, "tf32": key.tf32,
        "engine_key_sha256": key.digest(), "cuda_graph_batch": deployed.cuda_graph_batch,
    }
    subject = {**facts, "reference": reference, "reference_file": None,
               "deployed": f"TensorRT {key.tensorrt_version} model.plan on {key.gpu_name} "
                           f"(batch sizes {key.profile.text()}, {key.precision})"}
    tolerances = {"preset": preset, "overrides": config.tolerance_overrides,
                  "levels": {level: {"atol": tol.atol, "rtol": tol.rtol}
                             for level, tol in config.tolerances.items()}}
    report = parity_to_dict(result, subject, tolerances, reproduce)
    write_reports(report, directory)
    return report
