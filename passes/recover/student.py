"""The recovery student: the plan's graph in torch with its cut weights masked and a
BatchNorm re-inserted after dense layers.

Guarantees:
- ``Student(graph, masks, norms)`` is ``passes.recover.torch_graph.GraphModule(graph)`` with
  ``masks[node]`` (0/1, broadcastable against the node's weight) applied as
  ``W * mask`` on every forward, so masked entries get no gradient and export as 0;
- ``norms`` names Conv/Gemm nodes (see :func:`normable`) that get a BatchNorm after
  them. ``init_norms_identity`` makes each one the identity in eval mode (running
  stats = the measured mean m and variance v, gamma = sqrt(v + eps), beta = m);
  ``norms_off()`` runs as if none had been inserted;
- ``synced_norms()``: while it holds, the BatchNorms in training mode normalise with the
  statistics of the batch of every process of the ``torch.distributed`` group (sums
  all-reduced, differentiably, as ``nn.SyncBatchNorm`` does, but on any backend, gloo
  included), and update their running statistics with them, so N data-parallel processes
  train as one process on their whole batch would;
- ``merged[node] = (branch_of_channel, axis)`` names the layers merged at the head (the
  classifier) with the branch of each channel of their input; inside ``dropping(keep)``
  (``keep``: [batch, K] booleans, the head's column true) each sample's input to those
  layers has the channels of the branches it does not keep zeroed and the rest scaled by
  ``1 / s``, ``s`` the kept branches' share of the channels: what
  ``lcpc.runtime.degrade`` feeds the merge when those devices are missing. Outside it
  (evaluation, export) the layers see their input as it is;
- ``export_constants`` folds everything back into the graph's own constants:
  ``W' = (W * mask) * s``, ``b' = (b - running_mean) * s + beta`` with
  ``s = gamma / sqrt(running_var + eps)`` per output channel, so the exported graph
  (eval mode) computes what the student computes, with exact zeros outside the blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from lcpc.errors import LcpcError
from lcpc.ir import Graph, Node
from lcpc.passes.recover.torch_graph import TRAINABLE_OPS, GraphModule


def normable(graph: Graph) -> list[str]:
    """Nodes a BatchNorm can follow and fold back into: Conv (any group) and Gemm
    (alpha = beta = 1, no transA) with constant weight and a constant per-channel bias."""
    names = []
    for n in graph.nodes:
        if n.op not in ("Conv", "Gemm") or len(n.inputs) < 3:
            continue
        w, b = graph.constants.get(n.inputs[1]), graph.constants.get(n.inputs[2])
        c_out = graph.info(n.outputs[0]).shape[1]
        if w is None or b is None or b.size != c_out:
            continue
        if n.op == "Gemm" and (n.attr("transA", 0) or n.attr("alpha", 1.0) != 1.0 or n.attr("beta", 1.0) != 1.0):
            continue
        names.append(n.name)
    return names


class _SumOverProcesses(torch.autograd.Function):
    """The sum of a tensor over the processes of the group; its gradient is the sum of theirs."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        total = local.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        torch.distributed.all_reduce(total)
        return total


def synced_batch_norm(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``bn`` in training mode on ``x``, with the batch statistics of every process's ``x``: the
    per-channel count, sum and sum of squares are all-reduced (autograd carries the gradient
    back through the reduction to every process), and the running statistics are updated as
    ``bn`` would on the whole batch (momentum, unbiased variance)."""
    dims = [d for d in range(x.dim()) if d != 1]
    count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32, device=x.device)
    local = torch.cat([x.float().sum(dims), (x.float() * x.float()).sum(dims), count])
    total = _SumOverProcesses.apply(local)
    c = x.shape[1]
    n = total[2 * c]
    mean = total[:c] / n
    var = (total[c:2 * c] / n - mean * mean).clamp_min(0)
    tracked, running_mean, running_var = bn.num_batches_tracked, bn.running_mean, bn.running_var
    if bn.track_running_stats and tracked is not None and running_mean is not None and running_var is not None:
        with torch.no_grad():
            tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(tracked)
            running_mean.mul_(1 - m).add_(mean.detach() * m)
            running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)).clamp_min(0) * m)
    shape = [1, c] + [1] * (x.dim() - 2)
    y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.reshape(shape) + bn.bias.reshape(shape)
    return y.to(x.dtype)


class Student(GraphModule):
    """See the module docstring."""

    def __init__(self, graph: Graph, masks: dict[str, np.ndarray] | None = None, norms: Iterable[str] = (),
                 out_axes: Mapping[str, int] | None = None,
                 merged: Mapping[str, tuple[np.ndarray, int]] | None = None) -> None:
        """``out_axes[node]``: the output-channel axis of each normed node's weight
        (``weights.DenseWeight.out_axis``; 0 for a grouped Conv, and the default); ``merged``:
        see the module docstring."""
        super().__init__(graph)
        self.merged = {name: int(axis) for name, (_, axis) in (merged or {}).items()}
        self._keep: torch.Tensor | None = None
        for i, (node_name, (branch, _)) in enumerate((merged or {}).items()):
            self.register_buffer(f"branch{i}", torch.from_numpy(np.asarray(branch, np.int64)), persistent=False)
            self._key["branch:" + node_name] = f"branch{i}"
        self.masks = dict(masks or {})
        self.out_axes = dict(out_axes or {})
        self.norms = nn.ModuleDict()
        self._norm_key: dict[str, str] = {}     # node name -> key in self.norms
        self.norms_enabled = True
        self.norms_synced = False
        for i, (node_name, mask) in enumerate(self.masks.items()):
            self.register_buffer(f"mask{i}", torch.from_numpy(np.asarray(mask, np.float32)))
            self._key["mask:" + node_name] = f"mask{i}"
        self._check_masks()
        allowed = set(normable(graph))
        for i, node_name in enumerate(norms):
            if node_name not in allowed:
                raise LcpcError(f"internal: node '{node_name}' cannot take a BatchNorm (not a Conv/Gemm with bias)")
            info = graph.info(graph.node(node_name).outputs[0])
            rank = len(info.shape)
            cls = nn.BatchNorm1d if rank <= 3 else nn.BatchNorm2d if rank == 4 else nn.BatchNorm3d
            self.norms[f"n{i}"] = cls(info.shape[1])
            self._norm_key[node_name] = f"n{i}"

    def _check_masks(self) -> None:
        users: dict[str, int] = {}
        for n in self.graph.nodes:
            for i in n.inputs:
                users[i] = users.get(i, 0) + 1
        for node_name in self.masks:
            node = self.graph.node(node_name) if self.graph.has_node(node_name) else None
            if node is None or node.op not in TRAINABLE_OPS:
                raise LcpcError(f"internal: mask for '{node_name}', which is not a Conv/Gemm/MatMul node")
            if users[node.inputs[1]] > 1:
                raise LcpcError(f"{node.describe()}: its weight is shared with another node; "
                                f"recovery cannot mask a shared weight")

    def weight(self, node: Node) -> torch.Tensor:
        w = self.const(node.inputs[1])
        if node.name in self.masks:
            mask = getattr(self, self._key["mask:" + node.name])
            w = w * mask
        return w

    def before(self, node: Node, args: list) -> list:
        if self._keep is None or node.name not in self.merged:
            return args
        x, axis = args[0], self.merged[node.name]
        branch = getattr(self, self._key["branch:" + node.name])
        counts = torch.bincount(branch, minlength=self._keep.shape[1]).to(x.dtype)
        keep = self._keep.to(x.dtype)
        scale = (keep[:, branch] / (keep @ counts / branch.numel())[:, None]).to(x.dtype)  # [batch, C]
        shape = [1] * x.dim()
        shape[0], shape[axis] = x.shape[0], x.shape[axis]
        return [x * scale.reshape(shape)] + list(args[1:])

    def branch_count(self) -> int:
        """The branches the merged layers' inputs come from (0 when no layer is merged: no dropout)."""
        return max((int(getattr(self, self._key["branch:" + n]).max()) + 1 for n in self.merged), default=0)

    @contextmanager
    def dropping(self, keep: torch.Tensor) -> Iterator[None]:
        """Forward passes with, per sample, only the branches ``keep`` marks (module docstring)."""
        self._keep = keep
        try:
            yield
        finally:
            self._keep = None

    def after(self, node: Node, outs: list) -> list:
        if self.norms_enabled and node.name in self._norm_key:
            bn = self.norm(node.name)
            y = synced_batch_norm(outs[0], bn) if self.norms_synced and bn.training else bn(outs[0])
            return [y] + list(outs[1:])
        return outs

    @contextmanager
    def synced_norms(self) -> Iterator[None]:
        """BatchNorm statistics over the batches of all processes of the group (module docstring)."""
        self.norms_synced = True
        try:
            yield
        finally:
            self.norms_synced = False

    @contextmanager
    def norms_off(self) -> Iterator[None]:
        """Run as if no BatchNorm had been inserted (the masked graph itself)."""
        self.norms_enabled = False
        try:
            yield
        finally:
            self.norms_enabled = True

    def out_axis(self, node_name: str) -> int:
        return self.out_axes.get(node_name, 0)

    def norm(self, node_name: str) -> nn.modules.batchnorm._BatchNorm:
        bn = self.norms[self._norm_key[node_name]]
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        return bn

    def norm_stats(self, node_name: str) -> tuple[nn.modules.batchnorm._BatchNorm, torch.Tensor, torch.Tensor]:
        """The BatchNorm after ``node_name`` with its running mean and variance (always tracked here)."""
        bn = self.norm(node_name)
        mean, var = bn.running_mean, bn.running_var
        assert mean is not None and var is not None
        return bn, mean, var

    def normed(self) -> list[str]:
        return list(self._norm_key)

    @torch.no_grad()
    def init_norms_identity(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per normed node, ``stats[node] = (mean, var)`` of its output: identity in eval mode."""
        for node_name in self._norm_key:
            bn, running_mean, running_var = self.norm_stats(node_name)
            mean, var = stats[node_name]
            running_mean.copy_(mean)
            running_var.copy_(var)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(mean)

    @torch.no_grad()
    def export_constants(self) -> dict[str, np.ndarray]:
        """The graph's constants with trained weights: masks applied, BatchNorms folded."""
        out = {name: np.array(value, copy=True) for name, value in self.graph.constants.items()}
        for node in self.graph.nodes:
            if node.op not in TRAINABLE_OPS:
                continue
            for i in node.inputs[1:3]:
                if i in self.graph.constants and self._key[i] in self.params:
                    out[i] = self.const(i).detach().cpu().double().numpy()
            if node.name in self.masks:
                out[node.inputs[1]] = out[node.inputs[1]] * self.masks[node.name]
            if node.name in self._norm_key:
                bn, running_mean, running_var = self.norm_stats(node.name)
                scale = (bn.weight / torch.sqrt(running_var + bn.eps)).double().cpu().numpy()
                shift = bn.bias.double().cpu().numpy() - running_mean.double().cpu().numpy() * scale
                w = out[node.inputs[1]]
                shape = [1] * w.ndim
                shape[self.out_axis(node.name)] = -1
                out[node.inputs[1]] = w * scale.reshape(shape)
                b = out[node.inputs[2]]
                out[node.inputs[2]] = (b.reshape(-1) * scale + shift).reshape(b.shape)
        for name, value in out.items():
            out[name] = value.astype(self.graph.constants[name].dtype)
        return out
