"""What recovery is judged on: the checked data, its seeded split, and fidelity figures
of a student against the teacher on fixed training and held-out samples.

Guarantees: data are checked once (single input of the model's shape, finite, labels
one integer per sample); the split is ``lcpc.fidelity.holdout_split`` (the refit uses
the same one, so with the same seed no recovery stage ever trains on the held-out
samples); figures are ``lcpc.fidelity.compare`` of the student's logits against the
teacher's, with the per-sample held-out KL kept for model selection; warnings name
too little data, overfitting (training agreement far above held-out) and low agreement.
"""

from __future__ import annotations

import numpy as np

from lcpc.errors import LcpcError
from lcpc.fidelity import compare, kl_per_sample
from lcpc.ir import Graph

SMALL_DATA = 500          # fewer samples than this earns a warning
OVERFIT_GAP = 0.10        # train minus held-out agreement that earns a warning
LOW_AGREEMENT = 0.9       # held-out agreement below this earns a warning
FIGURES = ("samples", "top1_agreement", "top5_overlap", "kl_divergence", "max_rel_logit_error",
           "reference_accuracy", "candidate_accuracy")


def already_cut(g: Graph, masks: dict) -> bool:
    """True when every cut layer's weight is already zero outside its blocks."""
    weights = {n.name: g.constants[n.inputs[1]] for n in g.nodes if n.name in masks}
    return all(not np.any(weights[name] * (1 - mask)) for name, mask in masks.items())


def same_structure(original: Graph, g: Graph) -> Graph:
    same = [n.name for n in original.nodes] == [n.name for n in g.nodes] and \
        {k: v.shape for k, v in original.constants.items()} == {k: v.shape for k, v in g.constants.items()}
    if not same:
        raise LcpcError("recovery: the original graph given as teacher does not match the plan's graph "
                        "(different nodes or weight shapes)")
    return original


def check_data(g: Graph, data, labels) -> tuple[np.ndarray, np.ndarray | None]:
    if len(g.inputs) != 1:
        raise LcpcError(f"recovery handles single-input models; this one has inputs {', '.join(g.inputs)}")
    data = np.asarray(data)
    want = g.info(g.inputs[0]).shape
    if data.ndim != len(want) or tuple(data.shape[1:]) != tuple(want[1:]):
        raise LcpcError(f"recovery data has shape {list(data.shape)}; the model's input '{g.inputs[0]}' "
                        f"needs [N, {', '.join(map(str, want[1:]))}]")
    if len(data) < 4:
        raise LcpcError(f"recovery data holds {len(data)} samples; it needs training images (hundreds or more)")
    if not np.issubdtype(data.dtype, np.number) or not np.isfinite(data).all():
        raise LcpcError("recovery data must be finite numbers (found NaN, Inf or a non-numeric dtype)")
    y = None
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        if len(y) != len(data) or not np.issubdtype(y.dtype, np.integer):
            raise LcpcError(f"labels must be {len(data)} integers, one per sample (got {len(y)} of {y.dtype})")
        y = y.astype(np.int64)
    return np.ascontiguousarray(data, dtype=np.float32), y


def logits_tensor(g: Graph) -> str:
    """The first output, or the input of the Softmax that produces it."""
    producer = g.producer(g.outputs[0])
    if producer is not None and producer.op in ("Softmax", "LogSoftmax"):
        return producer.inputs[0]
    return g.outputs[0]


class Judge:
    """Fidelity (``lcpc.fidelity.compare``) of a student against the teacher on fixed
    training and held-out samples; keeps the last per-sample held-out KL for selection."""

    def __init__(self, teacher, name, x_all, y_all, train_eval, hold_idx, dev) -> None:
        import torch
        self.name, self.dev = name, dev
        self.parts = {p: idx for p, idx in (("train", train_eval), ("heldout", hold_idx)) if len(idx)}
        self.x = {p: torch.from_numpy(x_all[idx]) for p, idx in self.parts.items()}
        self.y = {p: (y_all[idx] if y_all is not None else None) for p, idx in self.parts.items()}
        self.t = {p: predict(teacher, x, name, dev).double().numpy() for p, x in self.x.items()}
        self.heldout_kl: np.ndarray | None = None

    def figures(self, student) -> dict:
        out = {}
        for part, x in self.x.items():
            s = predict(student, x, self.name, self.dev).double().numpy()
            fig = compare(self.t[part], s, self.y[part])
            out[part] = {k: fig[k] for k in FIGURES if fig.get(k) is not None}
            if part == "heldout":
                self.heldout_kl = kl_per_sample(self.t[part], s)
        return out

    def teacher_figures(self) -> dict:
        return {part: {"accuracy": compare(t, t, self.y[part])["reference_accuracy"]}
                for part, t in self.t.items() if self.y[part] is not None}


def headline(fig: dict) -> dict:
    """The held-out figures (training figures when nothing was held out)."""
    return fig.get("heldout", fig.get("train", {}))


def data_warnings(n: int, n_hold: int, masks: dict) -> list[str]:
    warnings = []
    if not masks:
        warnings.append("the plan cuts no layer: it is already exact, nothing to recover")
    if n < SMALL_DATA:
        warnings.append(f"only {n} samples: recovery needs hundreds to thousands of training images; "
                        f"expect it to fit these and generalise poorly")
    if n_hold == 0:
        warnings.append("no held-out data (holdout 0): every figure is measured on the training data")
    return warnings


def result_warnings(fig: dict) -> list[str]:
    if "heldout" not in fig:
        return []
    train, held = fig["train"]["top1_agreement"], fig["heldout"]["top1_agreement"]
    if train - held > OVERFIT_GAP:
        return [f"overfitting: agreement with the original is {100 * train:.1f}% on training data "
                f"but {100 * held:.1f}% on held-out data; recover with more data"]
    if held < LOW_AGREEMENT:
        return [f"held-out agreement with the original is only {100 * held:.1f}%: train longer "
                f"(more epochs), add data, or place sync points"]
    return []


def predict(module, x, name: str, dev, batch: int = 256):
    import torch
    was = module.training
    module.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(module.run({module.graph.inputs[0]: x[i:i + batch].to(dev)}, [name])[name].flatten(1).cpu())
    module.train(was)
    return torch.cat(outs) if outs else torch.zeros(0)
