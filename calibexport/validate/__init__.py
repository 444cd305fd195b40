"""Parity of a deployed artifact against the PyTorch calibrated model, with CI reports."""
