"""The backend lifecycle shared by ONNX Runtime, TensorRT and the PyTorch reference."""

from __future__ import annotations

import numpy as np

from calibexport.errors import CalibexportError


class EpsBackend:
    """Evaluate a calibrated noise prediction eps(x, timestep) on one engine.

    Use as a context manager: open in ``__init__``, evaluate with ``eps``, release in ``close``.
    ``eps`` checks its inputs, casts the timestep to ``timestep_dtype`` and calls ``_eps``.
    """

    name = "base"
    #: (C, H, W) of one image.
    image_shape: tuple[int, int, int]
    #: dtype of the network's timestep input, read from the model.
    timestep_dtype: np.dtype = np.dtype(np.float32)

    def __enter__(self) -> EpsBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the engine; the default has nothing to release."""

    def eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        """Return eps for x [B, C, H, W] float32 and timestep [B] in the model's input time."""
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.image_shape):
            raise CalibexportError(
                f"{self.name}: x must have shape [B, {', '.join(map(str, self.image_shape))}], got {list(x.shape)}."
            )
        if x.shape[0] == 0:
            raise CalibexportError(f"{self.name}: x has no samples (batch size 0).")
        timestep = np.asarray(timestep)
        if timestep.dtype.kind not in "biuf":
            raise CalibexportError(
                f"{self.name}: timestep must be a real number array (bool, integer or float), "
                f"got dtype {timestep.dtype}."
            )
        if timestep.shape != (x.shape[0],):
            raise CalibexportError(
                f"{self.name}: timestep must have shape [{x.shape[0]}] (one per sample), got {list(timestep.shape)}."
            )
        # Array methods rather than np.all/np.issubdtype: these checks run at every solver
        # evaluation, and the function wrappers cost more than the checks themselves.
        if not np.isfinite(timestep).all():
            # The timestep embedding turns an infinite time into NaN, and NaN selects no eta row.
            raise CalibexportError(
                f"{self.name}: timestep contains non-finite values "
                f"{timestep[~np.isfinite(timestep)][:4].tolist()}; pass finite model input times."
            )
        if self.timestep_dtype.kind in "iu":
            if timestep.dtype.kind == "f":
                rounded = np.round(timestep)
                if not (rounded == timestep).all():
                    raise CalibexportError(
                        f"{self.name}: the model takes integer timesteps but got non-integer "
                        f"values {timestep[rounded != timestep][:4].tolist()}; round them "
                        f"explicitly."
                    )
            limits = np.iinfo(self.timestep_dtype)
            if timestep.min() < limits.min or timestep.max() > limits.max:
                raise CalibexportError(
                    f"{self.name}: timestep values {timestep.min()}..{timestep.max()} do not fit "
                    f"the model's {self.timestep_dtype} input ({limits.min}..{limits.max})."
                )
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if timestep.dtype != self.timestep_dtype:
            timestep = timestep.astype(self.timestep_dtype)
        return self._eps(x, timestep)

    def _eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        raise NotImplementedError
