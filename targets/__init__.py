"""Targets: backends that write a plan in a format something else runs (``onnx``: per-device
ONNX files and ``manifest.json``). They read a plan and never change it; what runs a written
folder is the runtime (``lcpc.runtime``), not a target.
"""
