"""A SHA-256 digest of model weights that does not depend on the file format they came from.

Eta table sidecars and artifact manifests record this digest as the identity of the weights
that eta was estimated for. Two state_dicts get the same digest exactly when they have the same
key names and, per key, the same dtype, shape and element values.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

from calibexport.errors import CalibexportError

if TYPE_CHECKING:
    import torch


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Digest the tensors of a state_dict in sorted key order.

    For each key the digest takes a JSON header ``[key, dtype, shape]`` and a newline, then the
    raw bytes of the contiguous CPU tensor. The header fixes the byte length of the data that
    follows, so no two different state_dicts produce the same byte stream.
    """
    import torch

    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor):
            raise CalibexportError(
                f"cannot hash weights: entry {key!r} has type {type(tensor).__name__}, not a "
                "tensor; pass a state_dict that maps names to tensors."
            )
        if tensor.is_meta:
            raise CalibexportError(
                f"cannot hash weights: tensor {key!r} is on the meta device and has no data; "
                "load the weights before hashing them."
            )
        header = json.dumps([key, str(tensor.dtype), list(tensor.shape)])
        digest.update(header.encode("utf-8") + b"\n")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(data.numpy())
    return digest.hexdigest()
