"""Refit pass: cheap recovery of cut layers from calibration data (numpy + onnxruntime).

Works on the plan's graph in place of training, layer after layer in graph order, so
each layer sees the inputs the already-refitted cut model really produces:

- ``stats`` (BatchNorm re-estimation, folded): per output channel o of a cut layer,
  match the mean m and standard deviation s of the cut model's output to the
  original's on the calibration data: W'[o] = W[o] * s_orig / s_cut and
  b'[o] = (b[o] - m_cut) * s_orig / s_cut + m_orig.
- ``lsq`` (layer-wise reconstruction, He et al. 2017 / ThiNet): per branch k, refit the
  kept block W[own_k(out), own_k(in)] and the bias by ridge regression so that the
  cut layer, fed the cut model's own inputs, reproduces the original layer's output:
  min ||[P_k 1] [W_k; b_k] - Y_orig[own_k(out)]||^2 + lam ||W_k||^2, P_k = im2col of the
  branch's input channels (rows subsampled to ``max_rows``).

Guarantees: the cut structure is untouched (weights outside the kept blocks stay as
they were, so lowering still drops them); node and tensor names are unchanged, so
the partition and decisions stay valid; the returned report gives the calibration
KL divergence and top-1 agreement before and after.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from lcpc.calibrate import run_graph
from lcpc.errors import LcpcError
from lcpc.fidelity import compare
from lcpc.ir import Graph
from lcpc.plan import Plan
from lcpc.weights import masked_graph

LEVELS = ("stats", "lsq")


def run(plan: Plan, calib: np.ndarray, level: str = "lsq", max_rows: int = 20000, ridge: float = 1e-3,
        seed: int = 0) -> tuple[Plan, dict]:
    if level not in LEVELS:
        raise LcpcError(f"refit level {level}: choose one of {', '.join(LEVELS)}")
    cut = set(plan.cut_nodes())
    if not cut:
        return plan, {"level": level, "layers": 0}
    original = plan.graph
    reference = run_graph(original, calib)
    current = replace(plan, graph=masked_graph(plan, cut))
    before = compare(reference, run_graph(current.graph, calib))
    rng = np.random.default_rng(seed)
    nodes = {n.name: n for n in original.nodes}
    for node in original.nodes:
        if node.name not in cut:
            continue
        if node.op not in ("Conv", "Gemm", "MatMul"):
            continue
        x_cut, y_cut = run_graph(current.graph, calib, [node.inputs[0], node.outputs[0]])
        y_orig = run_graph(original, calib, [node.outputs[0]])[0]
        if level == "stats":
            constants = _match_stats(current, nodes[node.name], y_cut, y_orig)
        else:
            constants = _least_squares(current, nodes[node.name], x_cut, y_orig, max_rows, ridge, rng)
        current = replace(current, graph=_with_constants(current.graph, constants))
    after = compare(reference, run_graph(current.graph, calib))
    report = {"level": level, "layers": len(cut), "samples": int(len(calib)),
              "before": {k: before[k] for k in ("top1_agreement", "kl_divergence")},
              "after": {k: after[k] for k in ("top1_agreement", "kl_divergence")}}
    return replace(plan, graph=current.graph, _cache={}), report


def _with_constants(g: Graph, updates: dict[str, np.ndarray]) -> Graph:
    constants = dict(g.constants)
    constants.update(updates)
    return Graph(g.nodes, g.inputs, g.outputs, g.tensors, constants, g.opset, dict(g.extra_opsets), g.name)


def _weight_and_bias(plan: Plan, node) -> tuple[str, str | None, object]:
    b = plan.analysis.behaviours[node.name]
    w = node.inputs[b.weight]
    bias = node.inputs[b.bias] if b.bias is not None else None
    return w, bias, b


def _match_stats(plan: Plan, node, y_cut: np.ndarray, y_orig: np.ndarray) -> dict[str, np.ndarray]:
    g = plan.graph
    w_name, b_name, b = _weight_and_bias(plan, node)
    if b_name is None:
        return {}
    channel_axis = plan.analysis.axis(node.outputs[0])
    axes = tuple(a for a in range(y_cut.ndim) if a != channel_axis)
    m_c, s_c = y_cut.mean(axis=axes), y_cut.std(axis=axes) + 1e-6
    m_o, s_o = y_orig.mean(axis=axes), y_orig.std(axis=axes)
    scale = s_o / s_c
    w = g.constants[w_name]
    shape = [1] * w.ndim
    shape[b.out_axis] = -1
    bias = g.constants[b_name]
    if bias.size != m_c.size:
        return {}
    new_bias = (bias.reshape(-1) - m_c) * scale + m_o
    return {w_name: (w * scale.reshape(shape)).astype(w.dtype),
            b_name: new_bias.reshape(bias.shape).astype(bias.dtype)}


def _patches(x: np.ndarray, node, w_shape: tuple[int, ...]) -> np.ndarray:
    """im2col for a 2-D Conv: rows (n, oh, ow), columns (cin, kh, kw)."""
    kh, kw = w_shape[2:]
    pads = node.attr("pads", [0, 0, 0, 0])
    sh, sw = node.attr("strides", [1, 1])
    dh, dw = node.attr("dilations", [1, 1])
    if node.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise LcpcError(f"{node.describe()}: refit does not handle auto_pad={node.attr('auto_pad')}")
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, h, w = xp.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh:i * dh + sh * oh:sh, j * dw:j * dw + sw * ow:sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, c * kh * kw)


def _least_squares(plan: Plan, node, x: np.ndarray, y_orig: np.ndarray, max_rows: int, ridge: float,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    g = plan.graph
    w_name, b_name, b = _weight_and_bias(plan, node)
    w = g.constants[w_name].astype(np.float64)
    bias = g.constants[b_name].astype(np.float64).reshape(-1) if b_name else None
    if bias is not None and bias.size != y_orig.shape[1]:
        return {}
    conv = node.op == "Conv"
    if conv and (w.ndim != 4 or int(node.attr("group", 1)) != 1) or not conv and x.ndim != 2:
        return {}
    if not conv and b.out_axis == 0:  # Gemm transB=1: work with W as [in, out]
        w = w.T
    if not conv and (node.attr("alpha", 1.0) != 1.0 or node.attr("beta", 1.0) != 1.0):
        return {}
    y = y_orig.transpose(0, *range(2, y_orig.ndim), 1).reshape(-1, y_orig.shape[1]) if conv else y_orig
    rows = rng.choice(len(y), size=min(max_rows, len(y)), replace=False) if len(y) > max_rows else None
    for k in range(plan.k):
        own_out = plan.own(node.outputs[0], k)
        own_in = plan.own(node.inputs[0], k)
        if conv:
            p = _patches(x[:, own_in], node, w.shape)
        else:
            p = x[:, own_in]
        p = p[rows] if rows is not None else p
        t = y[rows][:, own_out] if rows is not None else y[:, own_out]
        if bias is not None:
            p = np.concatenate([p, np.ones((len(p), 1), p.dtype)], axis=1)
        p = p.astype(np.float64)
        reg = ridge * np.trace(p.T @ p) / max(p.shape[1], 1) * np.eye(p.shape[1])
        if bias is not None:
            reg[-1, -1] = 0.0
        sol = np.linalg.solve(p.T @ p + reg, p.T @ t.astype(np.float64))
        coef = sol[:-1] if bias is not None else sol
        if conv:
            w[np.ix_(own_out, own_in)] = coef.T.reshape(len(own_out), len(own_in), *w.shape[2:])
        else:
            w[np.ix_(own_in, own_out)] = coef
        if bias is not None:
            bias[own_out] = sol[-1]
    if not conv and b.out_axis == 0:
        w = w.T
    out = {w_name: w.astype(g.constants[w_name].dtype)}
    if b_name:
        out[b_name] = bias.reshape(g.constants[b_name].shape).astype(g.constants[b_name].dtype)
    return out
