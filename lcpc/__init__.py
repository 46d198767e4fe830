"""lcpc: compile image CNNs (ONNX) into LCP form.

K narrow, almost-independent branches, one per edge device, meeting only at a few
chosen points. The pipeline is

    frontend.load -> analysis.analyse -> planner.plan -> passes -> lower -> targets

and every public step raises :class:`lcpc.errors.LcpcError` with a message a user can
act on when the input is bad.
"""

__version__ = "0.1.0"
