"""lcpc: compile image CNNs (ONNX) into LCP form.

K narrow, almost-independent branches, one per edge device, meeting only at a few
chosen points. The pipeline is

    frontend.load -> analysis.analyse -> planner.plan (passes) -> lower -> targets

``lcpc.pipeline`` strings these together (convert, recover, verify) for the CLI, the
tests and the benchmarks; ``lcpc.weights`` is the one view of a dense layer's weight
that every step slicing weights uses. Every public step raises :class:`lcpc.errors.LcpcError` with a message a user can
act on when the input is bad.
"""

__version__ = "0.1.0"

__all__ = ["Deployment", "__version__"]


def __getattr__(name: str):
    """``lcpc.Deployment`` (the Python API for serving a folder), imported on first use so that
    ``import lcpc`` stays light."""
    if name == "Deployment":
        from lcpc.deployment import Deployment

        return Deployment
    raise AttributeError(f"module 'lcpc' has no attribute {name!r}")
