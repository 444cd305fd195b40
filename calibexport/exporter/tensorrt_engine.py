"""TensorRT engine builds on GPU hosts (TensorRT 10+ API, imported lazily)."""

from __future__ import annotations


def tensorrt_unavailable_reason() -> str | None:
    """Return why no engine can be built here, or None when TensorRT and a CUDA GPU are present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (install calibexport[gpu] on a GPU host)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None
