"""What recovery is judged on: a seeded split of the data, and fidelity figures of a student
against the teacher on fixed training and held-out samples, read a batch at a time.

Guarantees: the split is ``lcpc.fidelity.holdout_split`` (the refit uses the same one, so
with the same seed no recovery stage ever trains on the held-out samples); the teacher's
logits on the judged samples (at most ``MAX_TRAIN_EVAL`` training samples and the held-out
ones) are computed once and kept, the inputs are read again from the ``Samples`` for each
evaluation (``loader.Batches``), so memory holds logits, not images; figures are
``lcpc.fidelity.compare`` of the student's logits against the teacher's, with the per-sample
held-out KL kept for model selection; warnings name too little data, overfitting (training
agreement far above held-out) and low agreement. A ``Judge`` pickles without its teacher, so
a worker process can judge with it.
"""

from __future__ import annotations

import numpy as np

from lcpc.errors import LcpcError
from lcpc.fidelity import compare, kl_per_sample
from lcpc.ir import Graph

SMALL_DATA = 500          # fewer samples than this earns a warning
OVERFIT_GAP = 0.10        # train minus held-out agreement that earns a warning
LOW_AGREEMENT = 0.9       # held-out agreement below this earns a warning
MAX_TRAIN_EVAL = 2048     # training samples the figures are measured on (a seeded subset)
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


def logits_tensor(g: Graph) -> str:
    """The first output, or the input of the Softmax that produces it."""
    producer = g.producer(g.outputs[0])
    if producer is not None and producer.op in ("Softmax", "LogSoftmax"):
        return producer.inputs[0]
    return g.outputs[0]


class Judge:
    """Fidelity (``lcpc.fidelity.compare``) of a student against the teacher on fixed
    training and held-out samples; keeps the last per-sample held-out KL for selection."""

    def __init__(self, teacher, name: str, samples, labels, train_eval, hold_idx, dev, workers: int = 0,
                 timeout: float = 600.0) -> None:
        self.name, self.dev, self.samples, self.workers, self.timeout = name, dev, samples, workers, timeout
        self.parts = {p: np.asarray(idx) for p, idx in (("train", train_eval), ("heldout", hold_idx)) if len(idx)}
        self.y = {p: (labels[idx] if labels is not None else None) for p, idx in self.parts.items()}
        self.t = {p: self.predict(teacher, p) for p in self.parts}
        self.heldout_kl: np.ndarray | None = None

    def predict(self, module, part: str) -> np.ndarray:
        """``module``'s logits on one part, float64."""
        from lcpc.passes.recover.loader import Batches
        return predict(module, Batches(self.samples, self.parts[part], 256, self.workers, self.timeout),
                       self.name, self.dev).double().numpy()

    def figures(self, student) -> dict:
        out = {}
        for part in self.parts:
            s = self.predict(student, part)
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


def predict(module, batches, name: str, dev):
    """``module``'s logits (flattened, on the CPU) over an iterable of input batches, in eval mode."""
    import torch
    was = module.training
    module.eval()
    outs = []
    with torch.no_grad():
        for xb in batches:
            outs.append(module.run({module.graph.inputs[0]: xb.to(dev)}, [name])[name].flatten(1).float().cpu())
    module.train(was)
    return torch.cat(outs) if outs else torch.zeros(0)
