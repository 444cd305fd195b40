"""ONNX file helpers shared by export, fold and fp16 conversion: size, checks and atomic saves.

A protobuf message cannot reach 2 GiB, so a larger model keeps its weights in a separate file.
``check_model`` validates every model on a copy whose large weights are replaced by graph inputs
of the same type and shape, so that onnx.checker and shape inference never need the weights, and
checks the size of those weights itself.
This module needs onnx only, never torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from calibexport.errors import CalibexportError

logger = logging.getLogger(__name__)

#: A protobuf message cannot reach 2 GiB, so larger models keep their weights in a separate file
#: and onnx.checker cannot take them in memory.
PROTOBUF_LIMIT_BYTES = 2**31
# Initializers below this size stay inline in external-data saves and in structure-only copies,
# so the small shape tensors that shape inference propagates are kept.
_INLINE_BYTES = 1024


@contextlib.contextmanager
def quiet_loggers(minimum_levels: dict[str, int]) -> Iterator[None]:
    """Raise the named loggers to at least the given levels, then restore their own levels."""
    loggers = [logging.getLogger(name) for name in minimum_levels]
    levels = [item.level for item in loggers]
    for item, minimum in zip(loggers, minimum_levels.values()):
        item.setLevel(max(item.getEffectiveLevel(), minimum))
    try:
        yield
    finally:
        for item, level in zip(loggers, levels):
            item.setLevel(level)


def default_opset(model: onnx.ModelProto) -> int:
    """Return the version of the default ONNX operator set that ``model`` imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise CalibexportError("the model imports no default-domain ONNX opset.")


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Return the size of a tensor's values, whichever field stores them."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return 0
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def weight_bytes(model: onnx.ModelProto) -> int:
    """Return the bytes of all initializers stored inside ``model`` (external data excluded)."""
    return sum(tensor_bytes(tensor) for tensor in model.graph.initializer)


def is_large(model: onnx.ModelProto) -> bool:
    """Return whether ``model`` must be saved with external data: within 64 MiB of 2 GiB."""
    return weight_bytes(model) >= PROTOBUF_LIMIT_BYTES - 2**26


def structure_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` whose initializers above 1 KiB are graph inputs instead.

    The copy has the same nodes, types and shapes, so onnx.checker and shape inference give the
    same verdict as on ``model`` without holding its weights twice.
    """
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = model.graph
    light.graph.name = graph.name
    light.graph.node.extend(graph.node)
    light.graph.input.extend(graph.input)
    light.graph.output.extend(graph.output)
    light.graph.value_info.extend(graph.value_info)
    declared = {value.name for value in graph.input}
    for tensor in graph.initializer:
        if tensor_bytes(tensor) <= _INLINE_BYTES and tensor.data_location != TensorProto.EXTERNAL:
            light.graph.initializer.append(tensor)
        elif tensor.name not in declared:
            light.graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    return light


def check_model(model: onnx.ModelProto, *, what: str = "ONNX graph") -> onnx.ModelProto:
    """Run onnx.checker and strict shape inference; return the model with inferred shapes.

    The checks run on ``structure_only(model)``, and the returned model is that structure-only
    copy. Checking the full model would serialize the weights for the checker and again for
    shape inference, two extra copies at the peak memory of a build. Raises CalibexportError
    naming ``what`` on failure.
    """
    subject = structure_only(model)
    _check_initializer_sizes(model, what)
    try:
        onnx.checker.check_model(subject)
        return onnx.shape_inference.infer_shapes(subject, check_type=True, strict_mode=True,
                                                 data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CalibexportError(f"the {what} is invalid: {exc}") from exc


# Bytes per element of the types whose raw_data stores one fixed-size value per element.
_ITEM_BYTES = {
    TensorProto.FLOAT: 4, TensorProto.DOUBLE: 8, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2,
    TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2,
    TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT64: 8, TensorProto.UINT64: 8,
    TensorProto.BOOL: 1, TensorProto.COMPLEX64: 8, TensorProto.COMPLEX128: 16,
}
# The typed field of each type and how many of its values make one element.
_TYPED_FIELDS = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.DOUBLE: ("double_data", 1),
    TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1),
    TensorProto.UINT64: ("uint64_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.COMPLEX128: ("double_data", 2),
    **{kind: ("int32_data", 1) for kind in (
        TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT16,
        TensorProto.UINT8, TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.BFLOAT16)},
}


def _check_initializer_sizes(model: onnx.ModelProto, what: str) -> None:
    """Raise unless each inline initializer stores as many values as its dims need.

    ``structure_only`` hides the initializers above 1 KiB from onnx.checker, which would
    otherwise find a short ``raw_data``. Types missing from ``_ITEM_BYTES`` and
    ``_TYPED_FIELDS`` (strings, packed 4-bit and 8-bit float types) are left to ONNX Runtime.
    """
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            continue
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        if len(tensor.raw_data) > 0:
            item = _ITEM_BYTES.get(tensor.data_type)
            stored, needed, unit = len(tensor.raw_data), count * (item or 0), "bytes"
        else:
            field, per_element = _TYPED_FIELDS.get(tensor.data_type, (None, 0))
            item = field and per_element
            stored = len(getattr(tensor, field)) if field else 0
            needed, unit = count * per_element, f"{field} values"
        if item and stored != needed:
            raise CalibexportError(
                f"the {what} is invalid: initializer {tensor.name!r} stores {stored} {unit}, "
                f"but its dims {list(tensor.dims)} need {needed}."
            )


def check_and_annotate(model: onnx.ModelProto, *, what: str = "ONNX graph") -> onnx.ModelProto:
    """Check ``model`` like ``check_model`` and replace its value_info by the inferred shapes.

    Shape inference runs on the copy without weights, and only its value_info is copied back,
    so the weights are not serialized and parsed again. Returns ``model`` itself.
    """
    inferred = check_model(model, what=what)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def save_onnx(
    model: onnx.ModelProto, path: str | Path, *, external_data: bool | None = None
) -> None:
    """Write ``model`` to ``path`` through a temporary file in the same folder and os.replace.

    ``external_data`` None stores the weights inside the file unless the model nears the 2 GiB
    protobuf limit; True stores them in ``<name>.data`` beside it, replaced before the model file.
    """
    path = Path(path)
    if external_data is None:
        external_data = is_large(model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.tmp-", dir=path.parent) as tmp:
            tmp_model = Path(tmp) / path.name
            data_name = path.name + ".data"
            onnx.save_model(model, str(tmp_model), save_as_external_data=external_data,
                            all_tensors_to_one_file=True, location=data_name,
                            size_threshold=_INLINE_BYTES)
            if external_data:
                os.replace(Path(tmp) / data_name, path.parent / data_name)
            os.replace(tmp_model, path)
    except (OSError, ValueError) as exc:  # includes a folder that cannot be created or written
        raise CalibexportError(f"failed to write ONNX model {path}: {exc}") from exc
    logger.info("Wrote %s (%.1f MB%s).", path, path.stat().st_size / 1e6,
                ", weights in " + path.name + ".data" if external_data else "")


def dims(shape: onnx.TensorShapeProto) -> list[int | str]:
    """Return the dims of ``shape``: ints for static sizes, names (or "?") for symbolic ones."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]
