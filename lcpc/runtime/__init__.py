"""The runtime: everything that runs a written folder, and nothing of the compiler.

Guarantees: modules here read only a folder ``lcpc convert`` wrote (through
``lcpc.manifest``) and never import the front end, the planner, the passes or
onnx-graphsurgeon (``tests/test_install.py`` checks it in a fresh interpreter).
"""
