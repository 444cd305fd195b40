"""Backends evaluate the calibrated eps(x, timestep); the solver math lives elsewhere."""
