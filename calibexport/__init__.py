"""Calibrate diffusion noise-prediction networks and deploy them with the calibration folded in."""

__version__ = "0.1.0"
