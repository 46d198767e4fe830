"""One view of a dense layer's weight: its channel axes, branch blocks, cut mask and slices.

A Dense layer (``ops.Dense``: Conv/ConvTranspose with group 1, Gemm, MatMul) keeps its
weight in the layout its op wants (Conv ``[out, in, kh, kw]``, ConvTranspose
``[in, out, kh, kw]``, Gemm ``[in, out]`` or ``[out, in]`` with transB, MatMul
``[in, out]``). :class:`DenseWeight` names the two channel axes once, so that every
caller — lowering, the cut, calibration, the partition, refit, recovery, pruning and
quantisation — slices the same way.

Guarantees:
- ``rows(w, o)`` / ``cols(w, i)`` / ``block(w, o, i)`` select output channels ``o`` and
  input channels ``i`` and keep the weight's own layout (so the result is a valid weight
  for the same op); they work on numpy arrays and on torch tensors alike;
- ``matrix(w, o, i)`` is the block as a ``[len(i) * prod(kernel), len(o)]`` matrix whose
  row order is (input channel, kernel position) — the order of ``im2col`` / ``F.unfold``
  — and ``put_matrix`` writes such a matrix back in place (inverse of ``matrix``);
- ``mask(out_branch, in_branch)`` is 1 where the output and input channel sit in the
  same branch, broadcastable against the weight: ``w * mask`` computes exactly what the
  cut computes;
- ``im2col(x, ...)`` lays a 2-D Conv's input out as rows (sample, position) by columns
  (input channel, kernel position), the row order of ``matrix``, so ``im2col(x) @ matrix``
  is the convolution;
- ``energy(w)`` is ``E[o, i]``, the squared weights summed over the kernel axes;
- ``of_plan(plan, node)`` and ``branch_block(plan, node, k)`` read the plan's partition:
  branch k's block is ``block(w, own_k(out), own_k(in))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lcpc import ops
from lcpc.ir import Graph, Node


@dataclass(frozen=True)
class DenseWeight:
    """The weight of one dense node: constant ``weight`` (and ``bias``), channel axes."""

    node: str
    weight: str
    bias: str | None
    out_axis: int
    in_axis: int

    @staticmethod
    def of(node: Node, behaviour: ops.Dense) -> DenseWeight:
        bias = node.inputs[behaviour.bias] if behaviour.bias is not None else None
        return DenseWeight(node.name, node.inputs[behaviour.weight], bias or None, behaviour.out_axis,
                           behaviour.in_axis)

    # ------------------------------------------------------------------ selections
    def rows(self, w, out_idx):
        """Output channels ``out_idx`` of ``w``, in the weight's own layout."""
        return _take(w, out_idx, self.out_axis)

    def cols(self, w, in_idx):
        """Input channels ``in_idx`` of ``w``, in the weight's own layout."""
        return _take(w, in_idx, self.in_axis)

    def block(self, w, out_idx, in_idx):
        """Output channels ``out_idx`` by input channels ``in_idx``, in the weight's own layout."""
        return self.cols(self.rows(w, out_idx), in_idx)

    def oi(self, w):
        """A view of ``w`` with the output axis first, the input axis second, kernel axes after."""
        if isinstance(w, np.ndarray):
            return np.moveaxis(w, (self.out_axis, self.in_axis), (0, 1))
        return w.movedim((self.out_axis, self.in_axis), (0, 1))

    def matrix(self, w, out_idx, in_idx):
        """The block as ``[in * kernel, out]`` (rows in im2col order)."""
        b = self.oi(self.block(w, out_idx, in_idx))
        return b.reshape(b.shape[0], -1).T

    def put_matrix(self, w, out_idx, in_idx, m) -> None:
        """Write ``m`` (as returned by ``matrix``) into block (``out_idx``, ``in_idx``) of ``w`` in place."""
        view = self.oi(w)
        o, i = np.asarray(out_idx), np.asarray(in_idx)
        value = m.T.reshape((len(o), len(i)) + tuple(view.shape[2:]))
        if isinstance(w, np.ndarray):
            view[np.ix_(o, i)] = value.astype(w.dtype, copy=False)
        else:
            import torch

            oo, ii = torch.as_tensor(o, device=w.device), torch.as_tensor(i, device=w.device)
            view[oo[:, None], ii[None, :]] = value.to(w.dtype)

    def out_shape(self, w_ndim: int) -> list[int]:
        """A broadcast shape with -1 on the output axis (to scale output channels)."""
        shape = [1] * w_ndim
        shape[self.out_axis] = -1
        return shape

    # ------------------------------------------------------------------ the cut
    def mask(self, out_branch: np.ndarray, in_branch: np.ndarray, ndim: int, dtype=np.float32) -> np.ndarray:
        """1 where output and input channel share a branch; broadcastable against the weight."""
        shape = [1] * ndim
        shape[self.out_axis], shape[self.in_axis] = len(out_branch), len(in_branch)
        same = out_branch[:, None] == in_branch[None, :]
        if self.out_axis > self.in_axis:
            same = same.T
        return same.reshape(shape).astype(dtype)

    def energy(self, w: np.ndarray) -> np.ndarray:
        """``E[o, i]``: squared weights summed over the kernel axes (float64)."""
        sq = self.oi(np.asarray(w, dtype=np.float64)) ** 2
        return sq.reshape(sq.shape[0], sq.shape[1], -1).sum(axis=2)


def _take(w, idx, axis: int):
    if isinstance(w, np.ndarray):
        return np.take(w, np.asarray(idx, dtype=np.int64), axis=axis)
    import torch

    return w.index_select(axis, torch.as_tensor(np.asarray(idx, dtype=np.int64), device=w.device))


# ---------------------------------------------------------------------- plan-level helpers
def of_plan(plan, node: Node | str) -> DenseWeight:
    """The dense view of ``node`` (a Dense node of ``plan``'s graph)."""
    n = plan.graph.node(node) if isinstance(node, str) else node
    b = plan.analysis.behaviours[n.name]
    if not isinstance(b, ops.Dense):
        raise TypeError(f"{n.describe()} is not a dense layer")
    return DenseWeight.of(n, b)


def dense_nodes(graph: Graph, behaviours) -> list[tuple[Node, DenseWeight]]:
    """Every Dense node of ``graph`` with its view, in graph order."""
    return [(n, DenseWeight.of(n, behaviours[n.name])) for n in graph.nodes
            if isinstance(behaviours[n.name], ops.Dense)]


def cut_mask(plan, node: Node) -> np.ndarray:
    """The 0/1 mask the cut applies to ``node``'s weight under ``plan``'s partition."""
    view = of_plan(plan, node)
    w = plan.graph.constants[view.weight]
    return view.mask(plan.branches(node.outputs[0]), plan.branches(node.inputs[0]), w.ndim, w.dtype)


def branch_block(plan, node: Node, k: int) -> np.ndarray:
    """Branch ``k``'s block of ``node``'s weight: W[own_k(out), own_k(in)]."""
    view = of_plan(plan, node)
    return view.block(plan.graph.constants[view.weight], plan.own(node.outputs[0], k), plan.own(node.inputs[0], k))


def weight_masks(plan, cut: set[str] | None = None) -> dict[str, np.ndarray]:
    """For every cut layer (default: the plan's cut decisions), the mask of ``cut_mask``.

    Multiplying the original weight by its mask gives a model that computes exactly
    what the cut plan computes: this is how calibration and recovery run the LCP model
    as one graph.
    """
    cut = set(plan.cut_nodes()) if cut is None else cut
    return {n.name: cut_mask(plan, n) for n in plan.graph.nodes if n.name in cut}


def masked_graph(plan, cut: set[str] | None = None) -> Graph:
    """The plan's graph with every layer in ``cut`` multiplied by its cut mask."""
    g = plan.graph
    updates = {}
    for name, mask in weight_masks(plan, cut).items():
        w = of_plan(plan, name).weight
        updates[w] = g.constants[w] * mask
    return g.with_constants(updates)


def im2col(x: np.ndarray, kernel: tuple[int, int], strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0)) -> np.ndarray:
    """A 2-D Conv's input ``x`` [N, C, H, W] as rows (n, oh, ow) by columns (c, kh, kw)."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, h, w = xp.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, oh, ow, c, kh, kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i * dh:i * dh + sh * oh:sh, j * dw:j * dw + sw * ow:sw]
            cols[:, :, :, :, i, j] = window.transpose(0, 2, 3, 1)
    return cols.reshape(n * oh * ow, c * kh * kw)
