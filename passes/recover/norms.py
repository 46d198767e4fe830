"""BatchNorm re-insertion, the start of distillation: a BatchNorm after every
non-classifier Conv/Gemm with a bias (the front end folded the originals away), made the
identity on calibration data, then re-estimated toward the original model.

Guarantees: ``initialise`` leaves the student's function unchanged except for the
re-estimation step, which sets each inserted BatchNorm's output mean/std to the
original's and re-measures its running statistics (train mode, no gradient). Each
normed layer's weight rows are rescaled to the norms of the original's kept rows
(BatchNorm absorbs the scale, so the function does not change), which keeps Adam's
relative step size sane after a refit changed the weights' scale. Calibration data come as
a tensor or as any re-iterable of input batches (``loader.Batches``), so they need not fit in
memory.
"""

from __future__ import annotations

import numpy as np
import torch

from lcpc.ir import Graph


def initialise(student, teacher, original: Graph, calib, dev) -> None:
    """Insert, rescale and re-estimate the student's BatchNorms (module docstring)."""
    norms = student.normed()
    reference = {n: _original_row_norms(original, student, n) for n in norms}
    with student.norms_off():
        stats = channel_stats(student, calib, norms, dev)
    student.init_norms_identity(stats)
    _rescale_rows(student, reference)
    if norms:
        _reestimate(student, teacher, calib, norms, dev)


def _original_row_norms(original: Graph, student, node_name: str):
    node = next(n for n in student.graph.nodes if n.name == node_name)
    w = original.constants[node.inputs[1]].astype(np.float64)
    if node_name in student.masks:
        w = w * student.masks[node_name]
    axis = student.out_axis(node_name)
    w = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return torch.from_numpy(np.linalg.norm(w, axis=1)).float()


def batched(x, batch: int = 256):
    """``x`` as an iterable of input batches: a tensor cut into ``batch`` rows, else ``x`` itself."""
    if isinstance(x, torch.Tensor):
        return [x[i:i + batch] for i in range(0, len(x), batch)]
    return x


def channel_stats(module, x, nodes: list[str], dev, batch: int = 256) -> dict:
    """Per-channel mean and variance of each node's output over ``x`` (eval mode)."""
    g = module.graph
    outs = {n.name: n.outputs[0] for n in g.nodes if n.name in set(nodes)}
    acc: dict[str, list] = {}
    module.eval()
    with torch.no_grad():
        for xb in batched(x, batch):
            values = module.run({g.inputs[0]: xb.to(dev)}, list(outs.values()))
            for node, t in outs.items():
                v = values[t].double().transpose(0, 1).flatten(1)
                s = acc.setdefault(node, [0, 0, 0])
                s[0], s[1], s[2] = s[0] + v.sum(1), s[1] + (v * v).sum(1), s[2] + v.shape[1]
    stats = {}
    for node, (s1, s2, n) in acc.items():
        mean = s1 / n
        stats[node] = (mean.float(), (s2 / n - mean * mean).clamp_min(0).float())
    return stats


def _reestimate(student, teacher, calib, norms: list[str], dev) -> None:
    """Set each inserted BatchNorm's output mean/std to the original's, then re-measure."""
    target = channel_stats(teacher, calib, norms, dev)
    with torch.no_grad():
        for node in norms:
            bn = student.norm(node)
            bn.weight.copy_(torch.sqrt(target[node][1] + bn.eps))
            bn.bias.copy_(target[node][0])
    recalibrate(student, calib, dev)


def recalibrate(module, x, dev, batch: int = 256) -> None:
    """Running statistics of the inserted BatchNorms re-measured with the current weights:
    a cumulative average over ``x`` in train mode, without gradient."""
    bns = [module.norm(n) for n in module.normed()]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    module.train()
    with torch.no_grad():
        for xb in batched(x, batch):
            if len(xb) > 1:   # train-mode BatchNorm needs 2+ samples
                module.run({module.graph.inputs[0]: xb.to(dev)}, [])
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    module.eval()


def _row_norms(student, node_name: str):
    node = next(n for n in student.graph.nodes if n.name == node_name)
    w = student.weight(node).detach()
    return w.transpose(0, student.out_axis(node_name)).flatten(1).norm(dim=1)


def _rescale_rows(student, reference: dict) -> None:
    """Scale each normed layer's output rows back to their norms in ``reference``; its
    BatchNorm's running statistics scale along, so the function does not change."""
    with torch.no_grad():
        for node_name, ref in reference.items():
            node = student.graph.node(node_name)
            now = _row_norms(student, node_name)
            s = torch.where(now > 0, ref / now.clamp_min(1e-12), torch.ones_like(now))
            w = student.const(node.inputs[1])
            shape = [1] * w.dim()
            shape[student.out_axis(node_name)] = -1
            w.mul_(s.reshape(shape))
            bias = student.const(node.inputs[2])
            bias.mul_(s.reshape(bias.shape))
            bn = student.norm(node_name)
            bn.running_mean.mul_(s)
            bn.running_var.mul_(s * s)
