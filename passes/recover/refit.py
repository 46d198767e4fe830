"""Refit pass: recover a cut plan from unlabelled inputs by layer-wise ridge regression
(numpy + onnxruntime; no PyTorch).

In graph order, every cut dense layer (its K kept blocks) and every dense layer
downstream of a cut (its whole weight; the classifier included) is refit so that, fed
the refit model's *own* input (the layers before it already refit), it reproduces the
original model's pre-activation output (He et al. 2017, ThiNet):

    W = argmin |X W - Y|^2 + lam |W - W0|^2  =  (X^T X + lam I)^-1 (X^T Y + lam W0),
    lam = ridge * mean(diag(X^T X))

per block, with X the layer's input rows (im2col for a Conv, a ones column for the
bias), Y the original's output channels of the block and W0 the current weights (the
kept block of the original for a cut layer): the ridge pulls toward the prior instead
of toward zero. X^T X and X^T Y are accumulated batch by batch, so memory does not grow
with the data. Level ``stats`` instead matches, per output channel of each cut layer,
the mean m and std s of the cut model's output to the original's (a folded BatchNorm
re-estimation): W'[o] = W[o] s_orig / s_cut, b'[o] = (b[o] - m_cut) s_orig / s_cut + m_orig.

Guarantees: only constants change (weights outside the kept blocks stay as they
were, so lowering still drops them; nodes, tensors, partition and decisions are
untouched, so the lowered plan has the same stages and bytes); the data are split
(``fidelity.holdout_split``, seeded) and the refit sees only the training part (at most
``max_samples`` of it, held in memory; the held-out part is read ``READ`` samples at a
time, so memory does not grow with the data); the report gives fidelity before and after
on both parts (accuracy too with labels).
A layer the refit cannot linearise (ConvTranspose, grouped or auto-padded Conv,
a Gemm with alpha/beta != 1, inputs of rank != 2 for Gemm/MatMul) or too wide
(more than ``MAX_DIM`` unknowns per output) keeps its weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lcpc import ops
from lcpc.calibrate import Runner
from lcpc.errors import LcpcError
from lcpc.fidelity import compare, holdout_split
from lcpc.ir import Graph
from lcpc.passes.recover.samples import Samples, as_samples
from lcpc.plan import Plan
from lcpc.weights import DenseWeight, im2col, masked_graph, of_plan

LEVELS = ("lsq", "stats")
MAX_DIM = 4096            # most unknowns per output channel (normal-equation size)
MAX_ROWS = 16384          # im2col rows per layer the Gram matrices see (a random subset beyond)
READ = 256                # held-out samples read at a time
FIGURES = ("samples", "top1_agreement", "top5_overlap", "kl_divergence", "reference_accuracy",
           "candidate_accuracy")
Progress = Callable[[int, int, float | None], None]


def run(plan: Plan, data: Samples | np.ndarray, level: str = "lsq", labels: np.ndarray | None = None, *,
        holdout: float = 0.1, seed: int = 0, max_samples: int = 1024, ridge: float = 1e-3,
        progress: Progress | None = None) -> tuple[Plan, dict]:
    """Refit ``plan``'s cut layers on ``data``; see the module docstring.

    ``progress(done, total, agreement)`` is called after every refit layer (agreement
    None) and once at the end with the held-out agreement. Returns the plan and a report.
    """
    if level not in LEVELS:
        raise LcpcError(f"refit level {level}: choose one of {', '.join(LEVELS)}")
    start = time.perf_counter()
    cut = set(plan.cut_nodes())
    original = plan.graph
    samples = as_samples(data)
    train_idx, hold_idx = holdout_split(len(samples), holdout, seed)
    rng = np.random.default_rng(seed)
    calib_idx = np.sort(rng.permutation(train_idx)[:max_samples])
    calib = samples.take(calib_idx)
    parts = {p: v for p, v in (("train", calib_idx), ("heldout", hold_idx)) if len(v)}
    ys: dict = {"train": None, "heldout": None}
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        ys = {"train": labels[calib_idx], "heldout": labels[hold_idx]}

    def logits(g: Graph, part: str) -> np.ndarray:  # the training part is in memory; the held-out one is read
        if part == "train":
            return _logits(g, calib)
        idx = parts[part]
        return np.concatenate([_logits(g, samples.take(idx[i:i + READ])) for i in range(0, len(idx), READ)])

    reference = {p: logits(original, p) for p in parts}

    def figures(g: Graph) -> dict:
        out = {}
        for p in parts:
            fig = compare(reference[p], logits(g, p), ys[p])
            out[p] = {k: fig[k] for k in FIGURES if fig.get(k) is not None}
        return out

    current = masked_graph(plan, cut)
    stages = {"cut": figures(current)}
    layers = refit_layers(plan) if level == "lsq" else [n for n in original.nodes if n.name in cut]
    for i, node in enumerate(layers, 1):
        if level == "lsq":
            update = _least_squares(plan, current, original, node, node.name in cut, calib, ridge, rng)
        else:
            update = _match_stats(plan, current, original, node, calib)
        current = current.with_constants(update)
        if progress is not None:
            progress(i, len(layers), None)
    stages["refit"] = figures(current)
    headline = "heldout" if "heldout" in parts else "train"
    if progress is not None:
        progress(len(layers), len(layers), stages["refit"][headline]["top1_agreement"])
    report = {"level": level, "layers": len(layers), "samples": {"train": int(len(calib)), "heldout": len(hold_idx)},
              "holdout": holdout, "seed": seed, "ridge": ridge,
              "before": stages["cut"][headline], "after": stages["refit"][headline], "stages": stages,
              "seconds": round(time.perf_counter() - start, 2)}
    return replace(plan, graph=current), report


def refit_layers(plan: Plan) -> list:
    """Cut dense layers and dense layers downstream of a cut, in graph order."""
    g, cut = plan.graph, set(plan.cut_nodes())
    affected: set[str] = set()
    layers = []
    for node in g.nodes:
        downstream = any(i in affected for i in node.inputs)
        if node.name in cut or downstream:
            affected.update(o for o in node.outputs if o)
            if isinstance(plan.analysis.behaviours[node.name], ops.Dense) and _Linear.of(plan, node, g) is not None:
                layers.append(node)
    return layers


# ----------------------------------------------------------------------------- running
def _logits(g: Graph, x: np.ndarray) -> np.ndarray:
    return np.concatenate([b[0].reshape(len(b[0]), -1) for b in Runner(g, g.outputs[:1]).batches(x, 256)])


# ----------------------------------------------------------------------------- linearisation
@dataclass(frozen=True)
class _Linear:
    """A dense layer as input rows times the [in * kernel, out] matrix of ``weights.DenseWeight``."""

    view: DenseWeight
    conv: dict | None = None      # kernel, strides, dilations, pads of a 2-D Conv

    @staticmethod
    def of(plan: Plan, node, g: Graph) -> _Linear | None:
        view = of_plan(plan, node)
        w = g.constants.get(view.weight)
        if w is None or not np.issubdtype(w.dtype, np.floating):
            return None
        out_shape = g.info(node.outputs[0]).shape
        if view.bias is not None and (view.bias not in g.constants or len(out_shape) < 2
                                      or g.constants[view.bias].size != out_shape[1]):
            return None
        if node.op == "Conv":
            if w.ndim != 4 or node.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                return None
            return _Linear(view, dict(kernel=tuple(w.shape[2:]), strides=tuple(node.attr("strides", [1, 1])),
                                      dilations=tuple(node.attr("dilations", [1, 1])),
                                      pads=[int(p) for p in node.attr("pads", [0, 0, 0, 0])]))
        if node.op not in ("Gemm", "MatMul") or len(g.info(node.inputs[0]).shape) != 2 or w.ndim != 2:
            return None
        if node.op == "Gemm" and (node.attr("alpha", 1.0) != 1.0 or node.attr("beta", 1.0) != 1.0
                                  or node.attr("transA", 0)):
            return None
        return _Linear(view)

    def rows(self, x: np.ndarray) -> np.ndarray:
        """Input rows: (samples * positions, channels * kernel), in ``DenseWeight.matrix`` row order."""
        if self.conv is None:
            return x
        return im2col(x, self.conv["kernel"], self.conv["strides"], self.conv["dilations"], self.conv["pads"])

    def targets(self, y: np.ndarray) -> np.ndarray:
        """Output rows matching ``rows``: (samples * positions, out channels)."""
        return y if self.conv is None else y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])


def _blocks(plan: Plan, node, is_cut: bool, g: Graph) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input channels, output channels) of each block the refit solves."""
    if is_cut:
        ins, outs = plan.branches(node.inputs[0]), plan.branches(node.outputs[0])
        return [(np.nonzero(ins == k)[0], np.nonzero(outs == k)[0]) for k in range(plan.k)]
    return [(np.arange(g.info(node.inputs[0]).shape[1]), np.arange(g.info(node.outputs[0]).shape[1]))]


def _least_squares(plan: Plan, current: Graph, original: Graph, node, is_cut: bool, calib: np.ndarray,
                   ridge: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    layer = _Linear.of(plan, node, current)
    if layer is None:  # not a layer the refit can write (refit_layers leaves those out)
        return {}
    blocks = _blocks(plan, node, is_cut, current)
    per_in = int(np.prod(layer.conv["kernel"])) if layer.conv else 1
    if max(len(ii) for ii, _ in blocks) * per_in + 1 > MAX_DIM:
        return {}
    view = layer.view
    has_bias = view.bias is not None
    dims = [len(ii) * per_in + int(has_bias) for ii, _ in blocks]
    gram = [np.zeros((d, d)) for d in dims]
    cross = [np.zeros((d, len(oo))) for d, (_, oo) in zip(dims, blocks)]
    student = Runner(current, [node.inputs[0]])
    teacher = Runner(original, [node.outputs[0]])
    chunk = 64
    per_batch = max(1, -(-MAX_ROWS // -(-len(calib) // chunk)))
    for (xs,), (yt,) in zip(student.batches(calib, chunk), teacher.batches(calib, chunk)):
        rows, targets = layer.rows(xs), layer.targets(yt)
        if len(rows) > per_batch:
            keep = np.sort(rng.choice(len(rows), per_batch, replace=False))
            rows, targets = rows[keep], targets[keep]
        for b, (ii, oo) in enumerate(blocks):
            a = rows[:, (ii[:, None] * per_in + np.arange(per_in)).reshape(-1)].astype(np.float64)
            if has_bias:
                a = np.concatenate([a, np.ones((len(a), 1))], axis=1)
            gram[b] += a.T @ a
            cross[b] += a.T @ targets[:, oo].astype(np.float64)
    w = current.constants[view.weight].astype(np.float64)
    bias = current.constants[view.bias].astype(np.float64).reshape(-1) if view.bias is not None else None
    for (ii, oo), gm, cr in zip(blocks, gram, cross):
        prior = view.matrix(w, oo, ii)
        if bias is not None:
            prior = np.concatenate([prior, bias[oo][None]], axis=0)
        lam = ridge * max(float(np.mean(np.diag(gm))), 1e-12)
        sol = np.linalg.solve(gm + lam * np.eye(len(gm)), cr + lam * prior)
        view.put_matrix(w, oo, ii, sol[:len(sol) - int(has_bias)])
        if bias is not None:
            bias[oo] = sol[-1]
    out = {view.weight: w.astype(current.constants[view.weight].dtype)}
    if bias is not None and view.bias is not None:
        b0 = current.constants[view.bias]
        out[view.bias] = bias.reshape(b0.shape).astype(b0.dtype)
    return out


def _match_stats(plan: Plan, current: Graph, original: Graph, node, calib: np.ndarray) -> dict[str, np.ndarray]:
    view = of_plan(plan, node)
    if view.bias is None or view.bias not in current.constants:
        return {}
    sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, g in (("cut", current), ("orig", original)):
        s1: Any = 0
        s2: Any = 0
        n = 0
        for (y,) in Runner(g, [node.outputs[0]]).batches(calib):
            v = np.moveaxis(y, 1, 0).reshape(y.shape[1], -1).astype(np.float64)
            s1, s2, n = s1 + v.sum(1), s2 + (v * v).sum(1), n + v.shape[1]
        mean = s1 / n
        sums[name] = (mean, np.sqrt(np.maximum(s2 / n - mean * mean, 0)))
    (m_c, s_c), (m_o, s_o) = sums["cut"], sums["orig"]
    w, b = current.constants[view.weight], current.constants[view.bias]
    if b.size != len(m_c):
        return {}
    scale = s_o / (s_c + 1e-6)
    return {view.weight: (w * scale.reshape(view.out_shape(w.ndim))).astype(w.dtype),
            view.bias: ((b.reshape(-1) - m_c) * scale + m_o).reshape(b.shape).astype(b.dtype)}
