"""Export an uncalibrated noise-prediction network to ONNX: ``eps = net(x, t)``.

The graph has inputs ``x`` float32 [B, C, H, W] and ``t`` [B] (the model input time, in the dtype
the network expects) and one output ``eps`` [B, C, H, W]. Only the batch axis is dynamic, under the
name ``batch``. After export the saved graph is checked: the batch axis must be symbolic and the
output must depend on the values of ``t``, so a timestep baked in as a constant is rejected.

Exporter choice, measured with torch 2.13, onnxscript 0.7 and onnxruntime 1.32 on a small
``DDPMUNet`` (GroupNorm, attention, the right/bottom-padded Downsample):

* ``dynamo`` (the default, and torch's default since 2.9) matches torch within 2e-6 at opsets 18,
  20 and 21 and keeps the batch axis symbolic even with an example batch of 1. It also records
  the data flow of Python conversions such as ``float(t[0])``, where the TorchScript tracer turns
  them into constants and drops ``t`` from the graph. Asked for opset 17, it exports at 18 and
  converts down. For this UNet the conversion fails and the file stays at opset 18 with only a
  log warning, which ``export_onnx`` turns into an error.
* ``torchscript`` matches torch within 2e-6 at opsets 17, 18 and 21 and exported that model
  about 15 times faster (0.35 s against 5 s). But torch 2.13 marks it deprecated, and its tracer
  silently freezes any Python-side use of the timestep value.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.exporter.onnx_utils import (
    PROTOBUF_LIMIT_BYTES,
    default_opset,
    quiet_loggers,
    save_onnx,
)

if TYPE_CHECKING:
    import onnx
    import torch

logger = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
INPUT_NAMES = ("x", "t")
OUTPUT_NAME = "eps"
BATCH_AXIS_NAME = "batch"
#: Timestep dtypes the exported graph can take, as numpy dtype names.
TIMESTEP_DTYPES = ("float16", "float32", "float64", "int32", "int64")
# Ops whose output depends only on the shape of their input, never on its values.
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
# The dynamo exporter's graph passes log every rewrite at INFO (hundreds of lines per export),
# and its op registry warns about each torchvision op when torchvision is not installed.
_CHATTY_LOGGERS = {
    "onnxscript": logging.WARNING,
    "onnx_ir": logging.WARNING,
    "torch.onnx._internal.exporter._registration": logging.ERROR,
}


@dataclass(frozen=True)
class ExportInfo:
    """Provenance of an exported ONNX file, recorded in the artifact manifest."""

    path: str
    exporter: str
    opset: int
    torch_version: str
    timestep_dtype: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_onnx(
    module: torch.nn.Module,
    path: str | Path,
    *,
    image_shape: tuple[int, int, int],
    timestep_dtype: Any = np.float32,
    exporter: str | None = None,
    opset: int | None = None,
    example_batch: int = 2,
) -> ExportInfo:
    """Export ``module(x, timestep)`` to a single ONNX file at ``path`` and check the graph.

    ``image_shape`` is (C, H, W). ``timestep_dtype`` is the dtype of the graph input ``t``, one of
    ``TIMESTEP_DTYPES``. ``exporter`` None takes ``torchscript`` for a ``torch.jit.ScriptModule``
    (which the dynamo exporter cannot trace) and ``DEFAULT_EXPORTER`` otherwise. ``opset`` None
    takes the exporter's default. The module is traced in eval
    mode with ``example_batch`` samples, and its training flag is restored afterwards. The export
    is then run once in ONNX Runtime at ``example_batch + 1`` samples. The file is
    written through a temporary file in the same folder, so ``path`` never contains a partial
    export.
    Raises CalibexportError when the export fails or the saved graph breaks the contract above.
    """
    import torch

    if exporter is None:
        exporter = "torchscript" if _is_script_module(module) else DEFAULT_EXPORTER
    if exporter not in EXPORTERS:
        raise CalibexportError(
            f"invalid exporter {exporter!r}; valid choices: {', '.join(EXPORTERS)}."
        )
    dtype = _check_timestep_dtype(timestep_dtype)
    image_shape = _check_image_shape(image_shape)
    if example_batch < 1:
        raise CalibexportError(f"example_batch must be >= 1, got {example_batch}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    logger.info("Exporting %s to %s with the %s exporter (opset %s) ...", type(module).__name__,
                path, exporter, opset if opset is not None else "default")
    start = time.perf_counter()
    example = _example_inputs(image_shape, dtype, example_batch)
    large = _parameter_bytes(module) >= PROTOBUF_LIMIT_BYTES
    was_training = module.training
    module.eval()
    try:
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.tmp-", dir=path.parent) as tmp:
            tmp_path = Path(tmp) / path.name
            _run_exporter(_make_adapter(module), example, tmp_path, exporter, opset, large)
            model = _load_exported(tmp_path)
            check_exported_graph(model, image_shape=image_shape, timestep_dtype=dtype)
            saved_opset = default_opset(model)
            if opset is not None and saved_opset != opset:
                raise CalibexportError(
                    f"the {exporter} exporter wrote opset {saved_opset} although opset {opset} was "
                    "requested; choose another opset or the other exporter (the dynamo exporter "
                    "writes opset 18 and above only)."
                )
            _check_other_batch(tmp_path, image_shape, dtype, batch=example_batch + 1)
            _install(model, tmp_path, path)
    finally:
        module.train(was_training)

    seconds = time.perf_counter() - start
    logger.info("Exported %s (opset %d) in %.1fs. Done.", path, saved_opset, seconds)
    return ExportInfo(path=str(path), exporter=exporter, opset=saved_opset,
                      torch_version=torch.__version__, timestep_dtype=dtype.name, seconds=seconds)


def check_exported_graph(
    model: onnx.ModelProto, *, image_shape: tuple[int, int, int], timestep_dtype: Any
) -> None:
    """Raise CalibexportError unless ``model`` has the x/t/eps interface of ``export_onnx``.

    Checks the input and output names, the static [C, H, W] dims, a symbolic batch axis on every
    input and output, the dtype of ``t`` and that ``eps`` depends on the values of ``t``.
    """
    import onnx

    inputs = {value.name: value for value in model.graph.input}
    outputs = list(model.graph.output)
    if "t" not in inputs:
        raise CalibexportError(
            f"the exported graph has no input 't' (inputs: {sorted(inputs)}): the exporter baked "
            "the timestep in as a constant. Make the network compute with the timestep tensor "
            "(no float(t), int(t) or t.item()), or try the other exporter."
        )
    if "x" not in inputs or len(outputs) != 1 or outputs[0].name != OUTPUT_NAME:
        raise CalibexportError(
            f"the exported graph has inputs {sorted(inputs)} and outputs "
            f"{[o.name for o in outputs]}; expected inputs ['t', 'x'] and one output 'eps'. "
            "The network must return a single tensor."
        )
    expected_t = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(timestep_dtype))
    seen_t = inputs["t"].type.tensor_type.elem_type
    if seen_t != expected_t:
        raise CalibexportError(
            f"input 't' has ONNX type {onnx.TensorProto.DataType.Name(seen_t)}, expected "
            f"{onnx.TensorProto.DataType.Name(expected_t)}."
        )
    _check_dims(inputs["x"], (None, *image_shape))
    _check_dims(inputs["t"], (None,))
    _check_dims(outputs[0], (None, *image_shape))
    if not _depends_on_values(model.graph, "t", OUTPUT_NAME):
        raise CalibexportError(
            "the exported output 'eps' does not depend on the values of input 't' (at most on its "
            "shape): the exporter froze the timestep as a constant. Make the network compute with "
            "the timestep tensor (no float(t), int(t) or t.item()), or try the other exporter."
        )


def _check_other_batch(path: Path, image_shape: tuple[int, int, int], dtype: np.dtype,
                       batch: int) -> None:
    """Run the export in ONNX Runtime at ``batch`` to catch a batch size baked into the graph.

    A trace can record batch-dependent reshapes as constants (after ``int(x.shape[0])``, say)
    while the graph inputs still declare a symbolic batch axis.
    """
    import onnxruntime as ort

    x = np.zeros((batch, *image_shape), dtype=np.float32)
    t = np.arange(batch).astype(dtype)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # the failure is reported in the exception below
        # One run at an unseen batch size needs no speed. Without graph optimizations and weight
        # prepacking the session keeps one copy of the weights, not a reordered second one.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_cpu_mem_arena = False
        options.add_session_config_entry("session.disable_prepacking", "1")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (eps,) = session.run([OUTPUT_NAME], {"x": x, "t": t})
    except Exception as exc:  # onnxruntime raises its own exception types per failure
        raise CalibexportError(
            f"the exported graph fails at batch {batch} in ONNX Runtime, so the trace froze the "
            f"example batch size ({str(exc).strip()[:500]}). Compute shapes with tensor "
            "operations instead of int(x.shape[0]), or try the other exporter."
        ) from exc
    if eps.shape != x.shape:
        raise CalibexportError(
            f"the exported graph returns shape {list(eps.shape)} at batch {batch}, expected "
            f"{list(x.shape)}: the trace froze the example batch size. Compute shapes with "
            "tensor operations instead of int(x.shape[0]), or try the other exporter."
        )


def _is_script_module(module: torch.nn.Module) -> bool:
    import torch

    return isinstance(module, torch.jit.ScriptModule) or any(
        isinstance(child, torch.jit.ScriptModule) for child in module.modules())


def _make_adapter(network: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``network`` so that the traced forward has the graph input names ``x`` and ``t``.

    A ScriptModule is returned as it is: the tracer cannot call it from inside a Python module,
    and the TorchScript exporter names the inputs from ``input_names`` by position anyway.
    """
    import torch

    if isinstance(network, torch.jit.ScriptModule):
        return network

    class TimestepAdapter(torch.nn.Module):
        def __init__(self, network: torch.nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.network(x, t)

    return TimestepAdapter(network)


def _run_exporter(adapter: torch.nn.Module, example: tuple, path: Path, exporter: str,
                  opset: int | None, large: bool) -> None:
    import torch

    kwargs: dict[str, Any] = {
        "input_names": list(INPUT_NAMES),
        "output_names": [OUTPUT_NAME],
        "opset_version": opset,
    }
    if exporter == "dynamo":
        batch = torch.export.Dim(BATCH_AXIS_NAME)
        kwargs.update(dynamo=True, external_data=large, verbose=False,
                      dynamic_shapes={"x": {0: batch}, "t": {0: batch}})
    else:
        kwargs.update(dynamo=False, dynamic_axes={name: {0: BATCH_AXIS_NAME}
                                                  for name in (*INPUT_NAMES, OUTPUT_NAME)})
    with warnings.catch_warnings(record=True) as caught, quiet_loggers(_CHATTY_LOGGERS):
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                torch.onnx.export(adapter, example, str(path), **kwargs)
        except Exception as exc:  # the exporters raise many unrelated types
            other = "torchscript" if exporter == "dynamo" else "dynamo"
            raise CalibexportError(
                f"ONNX export with the {exporter} exporter failed: {type(exc).__name__}: "
                f"{str(exc).strip()[:2000]}\nTry --exporter {other} or another --opset."
            ) from exc
    for message in sorted({str(w.message).splitlines()[0] for w in caught}):
        logger.debug("exporter warning: %s", message)


def _example_inputs(image_shape: tuple[int, int, int], dtype: np.dtype,
                    batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *image_shape), generator=generator, dtype=torch.float32)
    # Distinct, non-zero integer times are exact in every supported dtype.
    t = torch.from_numpy((np.arange(batch) * 7 + 1).astype(dtype))
    return x, t


def _load_exported(path: Path) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError and others
        raise CalibexportError(f"the exporter wrote an unreadable ONNX file {path}: {exc}") from exc


def _install(model: onnx.ModelProto, tmp_path: Path, path: Path) -> None:
    """Move the export to ``path``: a single file, or one rewritten with one external data file."""
    if not any(_has_external_data(t) for t in model.graph.initializer):
        os.replace(tmp_path, path)
        return
    # The exporter split the weights into files of its own naming, all loaded into ``model`` now.
    save_onnx(model, path, external_data=True)


def _has_external_data(tensor: Any) -> bool:
    import onnx

    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _parameter_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_timestep_dtype(timestep_dtype: Any) -> np.dtype:
    try:
        dtype = np.dtype(timestep_dtype)
    except TypeError as exc:
        raise CalibexportError(
            f"invalid timestep dtype {timestep_dtype!r}; valid: {', '.join(TIMESTEP_DTYPES)}."
        ) from exc
    if dtype.name not in TIMESTEP_DTYPES:
        raise CalibexportError(
            f"invalid timestep dtype {dtype.name}; valid: {', '.join(TIMESTEP_DTYPES)}."
        )
    return dtype


def _check_image_shape(image_shape: Any) -> tuple[int, int, int]:
    shape = tuple(int(d) for d in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise CalibexportError(
            f"image_shape must be (C, H, W) with positive sizes, got {list(image_shape)}."
        )
    return shape  # type: ignore[return-value]


def _check_dims(value: Any, expected: tuple[int | None, ...]) -> None:
    """Check a symbolic batch axis, and the static sizes in ``expected`` past its first entry."""
    dims = list(value.type.tensor_type.shape.dim)
    described = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in dims]
    if not dims or dims[0].HasField("dim_value") or not dims[0].dim_param:
        raise CalibexportError(
            f"the batch axis of {value.name!r} is not symbolic in the exported graph (shape "
            f"{described}), so the exporter specialised it to the example batch. An example "
            "batch of 1 or int(x.shape[0]) in the network does this. Export with example_batch "
            ">= 2, compute shapes with tensor operations, or try the other exporter."
        )
    if len(expected) > 1 and len(dims) != len(expected):
        raise CalibexportError(
            f"{value.name!r} has shape {described}, expected rank {len(expected)}."
        )
    for axis, size in enumerate(expected[1:], start=1):
        if not dims[axis].HasField("dim_value") or dims[axis].dim_value != size:
            raise CalibexportError(
                f"{value.name!r} has shape {described}; axis {axis} must be static with size "
                f"{size} (only the batch axis is dynamic)."
            )


def _depends_on_values(graph: Any, source: str, target: str) -> bool:
    """Return whether ``target`` is reachable from ``source`` through value-carrying ops.

    ``Shape`` and ``Size`` read only the shape of their input, so a path through them does not
    count. Subgraphs of control-flow ops count as consuming every outer name they reference.
    One pass suffices because ONNX requires the nodes of a graph in topological order.
    """
    reached = {source}
    for node in graph.node:
        if node.op_type not in _SHAPE_ONLY_OPS and not reached.isdisjoint(_node_inputs(node)):
            reached.update(node.output)
    return target in reached


def _node_inputs(node: Any) -> set[str]:
    names = set(node.input)
    for attribute in node.attribute:
        subgraphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for subgraph in subgraphs:
            for inner in subgraph.node:
                names |= _node_inputs(inner)
    return names
