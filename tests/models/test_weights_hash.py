"""weights_sha256: a digest of names, dtypes, shapes and values, independent of storage."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from calibexport.errors import CalibexportError
from calibexport.models import weights_sha256


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(4, 3, generator=generator),
        "a.bias": torch.randn(4, generator=generator),
        "c.scale": torch.tensor(2.5),
    }


def test_byte_layout():
    # Recomputed with numpy from the documented layout, so a format change shows up here.
    state = {"z": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([1.5])}
    digest = hashlib.sha256()
    for key, dtype, array in [("a", "torch.float32", np.array([1.5], dtype="<f4")),
                              ("z", "torch.float32", np.arange(6, dtype="<f4").reshape(2, 3))]:
        digest.update((json.dumps([key, dtype, list(array.shape)]) + "\n").encode())
        digest.update(array.tobytes())

    assert weights_sha256(state) == digest.hexdigest()


def test_key_order_irrelevant(state):
    reordered = dict(reversed(list(state.items())))

    assert weights_sha256(reordered) == weights_sha256(state)


def test_storage_layout_irrelevant(state):
    transposed = state["b.weight"].t().contiguous().t()
    assert not transposed.is_contiguous()

    assert weights_sha256({**state, "b.weight": transposed}) == weights_sha256(state)


def test_parameters_hash_like_tensors(state):
    as_params = {key: torch.nn.Parameter(t.clone()) for key, t in state.items()}

    assert weights_sha256(as_params) == weights_sha256(state)


def test_value_change_detected(state):
    changed = dict(state)
    changed["a.bias"] = state["a.bias"].clone()
    changed["a.bias"][0] += 1e-6

    assert weights_sha256(changed) != weights_sha256(state)


def test_dtype_change_detected(state):
    as_double = {**state, "c.scale": state["c.scale"].double()}

    assert weights_sha256(as_double) != weights_sha256(state)


def test_shape_change_detected(state):
    reshaped = {**state, "b.weight": state["b.weight"].reshape(3, 4)}

    assert weights_sha256(reshaped) != weights_sha256(state)


def test_key_rename_detected(state):
    renamed = {("module." + key): t for key, t in state.items()}

    assert weights_sha256(renamed) != weights_sha256(state)


def test_bfloat16_hashes(state):
    digest = weights_sha256({key: t.bfloat16() for key, t in state.items()})

    assert len(digest) == 64
    assert digest != weights_sha256(state)


def test_meta_tensor_rejected():
    with pytest.raises(CalibexportError, match="'w' is on the meta device"):
        weights_sha256({"w": torch.empty(3, device="meta")})


def test_non_tensor_rejected():
    with pytest.raises(CalibexportError, match="entry 'step' has type int, not a tensor"):
        weights_sha256({"step": 3})
