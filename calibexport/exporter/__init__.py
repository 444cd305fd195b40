"""Export to ONNX, fold eta into the graph, and write artifacts atomically with a manifest.

Submodules are imported on demand: ``onnx_export`` needs torch, ``fold`` needs only onnx.
"""
