"""The runtime: everything that runs a written folder, and nothing of the compiler.

    manifest   the file format and its typed view (``read`` -> ``Manifest``: stages, transfers, devices)
    order      the one run order: input transfers, then per level the stages, then its transfers
    session    the one factory of onnxruntime sessions (and a stage's checked session)
    feeds      input checks, planned batches, the bytes each transfer moved (``Stats``)
    engine     ``Engine``, what every engine does, and ``open_engine`` by name
    local      engine ``local``: onnxruntime threads in this process
    ray        engine ``ray``: one Ray actor per device (actor calls or one compiled graph)
    deployment ``lcpc.Deployment``: a folder kept warm, answering a stream of requests
    serving    what ``lcpc serve`` prints
    bench      ``lcpc bench``: the stages timed against the original model

Guarantees: modules here read only a folder ``lcpc convert`` wrote (through
``runtime.manifest``) and never import the front end, the planner, the passes, the
targets or onnx-graphsurgeon (``tests/test_install.py`` checks it in a fresh
interpreter); the compiler imports the manifest and the run order from here, never
the other way round.
"""
