"""Recovery pass: distil the original model (teacher) into the cut plan (student).

Guarantees:
- the returned plan differs from the input only in its graph's constants: nodes,
  tensors, layouts, partition and decisions are unchanged, so lowering it yields the
  same stages and the same bytes per inference;
- cut layers stay cut: the student trains ``W * mask`` (``lcpc.weights.weight_masks``),
  exported weights are exactly zero outside the blocks, so the lowered plan computes
  what the trained student computes (in eval mode);
- ``data`` is split (seeded) into a training part and a held-out part; the report
  gives top-1 agreement with the original (and accuracy when labels are given) on
  both, before and after, and warns when the held-out figure trails the training
  figure (overfitting) or the data set is small.

Recipe (``benchmarks/recovery.py`` measures each level on the digits example):
1. *Layer-wise refit* (He et al. 2017 / ThiNet-style reconstruction): in graph
   order, every cut Conv/Gemm block, and every dense layer downstream of a cut
   (the classifier included), is refit by ridge regression so that, fed with the
   student's own (already refit) input, it reproduces the original's pre-activation
   output on calibration images: ``W = argmin |X_s W - Y_t|^2 + lam |W - W_0|^2``.
2. *BatchNorm re-insertion*: a BatchNorm goes after every non-classifier Conv/Gemm
   with a bias (the front end folded the originals away), initialised to the
   identity on calibration data, then *re-estimated*: its output mean/std are set to
   the original's, and its running statistics re-measured in train mode. Each refit
   weight row is rescaled to its original norm (BatchNorm absorbs the scale, so the
   function is unchanged), which keeps Adam's relative step size sane.
3. *Distillation*: KL(softmax(t/T) || softmax(s/T)) * T^2 with T = 2 on the same
   (optionally shifted/flipped) batch for teacher and student, plus cross-entropy on
   labels when given; AdamW, linear warm-up then cosine decay; BatchNorm trains on
   batch statistics with momentum-updated running statistics, re-measured over the
   calibration images before every evaluation (a cumulative average over the whole
   run mixes in statistics of stale weights).
4. *Model selection*: after each epoch the held-out KL is compared, sample by sample,
   with the best epoch's; the latest epoch is kept unless it is worse by more than
   two standard errors (then the best is restored); two such epochs in a row stop
   training early.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from lcpc import ops
from lcpc.errors import LcpcError
from lcpc.ir import Graph
from lcpc.plan import Plan

Progress = Callable[[int, int, int, float, float | None], None]
SMALL_DATA = 500          # fewer samples than this earns a warning
OVERFIT_GAP = 0.10        # train minus held-out agreement that earns a warning
LOW_AGREEMENT = 0.9       # held-out agreement below this earns a warning
FIGURES = ("samples", "top1_agreement", "top5_overlap", "kl_divergence", "max_rel_logit_error",
           "reference_accuracy", "candidate_accuracy")
MAX_HELDOUT = 5000
MAX_TRAIN_EVAL = 2048
REFIT_MAX_DIM = 4096      # largest normal-equation system a refit solves
REFIT_FLOP_BUDGET = 2e12  # caps refit samples on large models


@dataclass(frozen=True)
class Recipe:
    """Every knob of a recovery run; the report records the one used."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.2            # fraction of the steps with a linear warm-up
    temperature: float = 2.0
    label_weight: float = 0.5      # weight of cross-entropy on labels, when given
    augment: str = "shift"         # none | shift | shift+flip | flip
    max_shift: int | None = None   # pixels; None: a 16th of the image side
    patience: int = 2
    refit: bool = True
    ridge: float = 1e-3            # lam relative to the mean diagonal of X^T X
    calib_samples: int = 1024
    bn_momentum: float = 0.1

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise LcpcError(f"recovery: epochs must be >= 0, batch size >= 1 and learning rate > 0 "
                            f"(got {self.epochs}, {self.batch_size}, {self.lr})")
        if self.augment not in ("none", "shift", "flip", "shift+flip"):
            raise LcpcError(f"recovery: augment '{self.augment}': choose none, shift, flip or shift+flip")


def _torch():
    try:
        import torch
    except ImportError:
        raise LcpcError("recovery needs PyTorch: pip install 'lcpc[train]'") from None
    return torch


def run(plan: Plan, data: np.ndarray, labels: np.ndarray | None = None, *, epochs: int = 2,
        batch_size: int = 32, lr: float = 1e-3, holdout: float = 0.1, seed: int = 0,
        progress: Progress | None = None, device: str | None = None, augment: str = "shift",
        original: Graph | None = None, **recipe_overrides) -> tuple[Plan, dict]:
    """Distil the original model into the cut plan on ``data``; see the module docstring.

    The teacher is ``original`` when given (the same graph with the original weights,
    for a plan whose weights an earlier pass already changed), else ``plan.graph``; the
    student starts from ``plan.graph``'s weights. ``recipe_overrides`` sets any other
    :class:`Recipe` field (``temperature``, ``refit``, ``max_shift``, ...).

    ``progress(epoch, step, steps, loss, heldout_agreement)`` is called after every
    step (1-based epoch and step, agreement None) and once more at the end of each
    epoch (step == steps, agreement measured). Returns the new plan and a report.
    """
    torch = _torch()
    from lcpc.weights import weight_masks
    from lcpc.torch_graph import GraphModule, normable

    try:
        recipe = Recipe(epochs=epochs, batch_size=batch_size, lr=lr, augment=augment, **recipe_overrides)
    except TypeError as exc:
        raise LcpcError(f"recovery: {exc} (settings: {', '.join(Recipe.__dataclass_fields__)})") from None
    if not 0 <= holdout < 1:
        raise LcpcError(f"recovery: holdout {holdout} must be in [0, 1)")
    start = time.perf_counter()
    g = plan.graph
    x_all, y_all = _check_data(g, data, labels)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x_all))
    n_hold = min(int(round(holdout * len(x_all))), MAX_HELDOUT, len(x_all) - 2)
    hold_idx, train_idx = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    train_eval = np.sort(rng.permutation(train_idx)[:MAX_TRAIN_EVAL])
    calib = torch.from_numpy(x_all[rng.permutation(train_idx)[:recipe.calib_samples]])
    name = _logits_tensor(g)
    masks = weight_masks(plan)
    warnings = _data_warnings(len(x_all), n_hold, masks)

    if original is None and masks and _already_cut(g, masks):
        raise LcpcError("recovery: the plan's weights are already cut (an earlier pass zeroed the cross-branch "
                        "weights), so they cannot teach; pass original=<the graph with the original weights>")
    teacher = GraphModule(_same_structure(original, g) if original is not None else g).to(dev).eval()
    teacher.requires_grad_(False)
    norms = [n for n in normable(g) if n not in plan.analysis.terminal]
    student = GraphModule(g, masks, norms).to(dev)
    judge = _Judge(teacher, name, x_all, y_all, train_eval, hold_idx, dev)
    stages: dict[str, dict] = {}

    with student.norms_off():
        stages["cut"] = judge.figures(student)
    history, steps_run, best_epoch, stopped = [], 0, 0, False
    if masks:
        _initialise(student, teacher, judge, plan, calib, recipe, dev, stages)
        if recipe.epochs:
            history, steps_run, best_epoch, stopped = _distil(student, teacher, judge, recipe, x_all, y_all,
                                                              train_idx, calib, name, dev, gen, progress)
        student.eval()
        stages["recovered"] = judge.figures(student)
        g = replace(g, constants=student.export_constants())
    else:
        stages["recovered"] = stages["cut"]
    warnings += _result_warnings(stages["recovered"])
    report = {
        "before": _headline(stages["cut"]), "after": _headline(stages["recovered"]),
        "recipe": asdict(recipe), "holdout": holdout, "seed": seed, "device": str(dev),
        "samples": {"train": len(train_idx), "heldout": n_hold},
        "teacher": judge.teacher_figures(),
        "stages": stages, "history": history,
        "epochs_run": len(history), "steps": steps_run, "best_epoch": best_epoch, "stopped_early": stopped,
        "seconds": round(time.perf_counter() - start, 2), "warnings": warnings,
    }
    return replace(plan, graph=g), report


# --------------------------------------------------------------------------- data and figures
def _already_cut(g: Graph, masks: dict) -> bool:
    """True when every cut layer's weight is already zero outside its blocks."""
    weights = {n.name: g.constants[n.inputs[1]] for n in g.nodes if n.name in masks}
    return all(not np.any(weights[name] * (1 - mask)) for name, mask in masks.items())


def _same_structure(original: Graph, g: Graph) -> Graph:
    same = [n.name for n in original.nodes] == [n.name for n in g.nodes] and \
        {k: v.shape for k, v in original.constants.items()} == {k: v.shape for k, v in g.constants.items()}
    if not same:
        raise LcpcError("recovery: the original graph given as teacher does not match the plan's graph "
                        "(different nodes or weight shapes)")
    return original


def _check_data(g: Graph, data, labels) -> tuple[np.ndarray, np.ndarray | None]:
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


def _logits_tensor(g: Graph) -> str:
    """The first output, or the input of the Softmax that produces it."""
    producer = g.producer(g.outputs[0])
    if producer is not None and producer.op in ("Softmax", "LogSoftmax"):
        return producer.inputs[0]
    return g.outputs[0]


class _Judge:
    """Fidelity (``lcpc.fidelity.compare``) of a student against the teacher on fixed
    training and held-out samples; keeps the last per-sample held-out KL for selection."""

    def __init__(self, teacher, name, x_all, y_all, train_eval, hold_idx, dev) -> None:
        import torch
        self.name, self.dev = name, dev
        self.parts = {p: idx for p, idx in (("train", train_eval), ("heldout", hold_idx)) if len(idx)}
        self.x = {p: torch.from_numpy(x_all[idx]) for p, idx in self.parts.items()}
        self.y = {p: (y_all[idx] if y_all is not None else None) for p, idx in self.parts.items()}
        self.t = {p: _predict(teacher, x, name, dev).double().numpy() for p, x in self.x.items()}
        self.heldout_kl = None

    def figures(self, student) -> dict:
        from lcpc.fidelity import compare, log_softmax
        out = {}
        for part, x in self.x.items():
            s = _predict(student, x, self.name, self.dev).double().numpy()
            fig = compare(self.t[part], s, self.y[part])
            out[part] = {k: fig[k] for k in FIGURES if fig.get(k) is not None}
            if part == "heldout":
                lp, lq = log_softmax(self.t[part]), log_softmax(s)
                self.heldout_kl = np.maximum((np.exp(lp) * (lp - lq)).sum(axis=1), 0.0)
        return out

    def teacher_figures(self) -> dict:
        from lcpc.fidelity import compare
        return {part: {"accuracy": compare(t, t, self.y[part])["reference_accuracy"]}
                for part, t in self.t.items() if self.y[part] is not None}


def _headline(fig: dict) -> dict:
    """The held-out figures (training figures when nothing was held out)."""
    return fig.get("heldout", fig.get("train", {}))


def _data_warnings(n: int, n_hold: int, masks: dict) -> list[str]:
    warnings = []
    if not masks:
        warnings.append("the plan cuts no layer: it is already exact, nothing to recover")
    if n < SMALL_DATA:
        warnings.append(f"only {n} samples: recovery needs hundreds to thousands of training images; "
                        f"expect it to fit these and generalise poorly")
    if n_hold == 0:
        warnings.append("no held-out data (holdout 0): every figure is measured on the training data")
    return warnings


def _result_warnings(fig: dict) -> list[str]:
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


def _predict(module, x, name: str, dev, batch: int = 256):
    import torch
    was = module.training
    module.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(module.run({module.graph.inputs[0]: x[i:i + batch].to(dev)}, [name])[name].flatten(1).cpu())
    module.train(was)
    return torch.cat(outs) if outs else torch.zeros(0)


# --------------------------------------------------------------------------- initialisation
def _initialise(student, teacher, judge: "_Judge", plan: Plan, calib, recipe: Recipe, dev, stages: dict) -> None:
    """Recipe steps 1 and 2: layer-wise refit, then BatchNorm insertion and re-estimation."""
    norms = student.normed()
    with student.norms_off():
        reference = {n: _row_norms(student, n) for n in norms}
        if recipe.refit:
            _refit(student, teacher, calib[:_refit_samples(plan, recipe.calib_samples)], plan, dev, recipe.ridge)
            stages["refit"] = judge.figures(student)
        stats = _channel_stats(student, calib, norms, dev)
    student.init_norms_identity(stats)
    _rescale_rows(student, reference)
    if norms:
        _reestimate(student, teacher, calib, norms, dev)
        stages["bn_reestimated"] = judge.figures(student)


def _channel_stats(module, x, nodes: list[str], dev, batch: int = 256) -> dict:
    """Per-channel mean and variance of each node's output over ``x`` (eval mode)."""
    import torch
    g = module.graph
    outs = {n.name: n.outputs[0] for n in g.nodes if n.name in set(nodes)}
    acc: dict[str, list] = {}
    module.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            values = module.run({g.inputs[0]: x[i:i + batch].to(dev)}, list(outs.values()))
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
    import torch
    target = _channel_stats(teacher, calib, norms, dev)
    with torch.no_grad():
        for node in norms:
            bn = student.norm(node)
            bn.weight.copy_(torch.sqrt(target[node][1] + bn.eps))
            bn.bias.copy_(target[node][0])
    _recalibrate(student, calib, dev)


def _recalibrate(module, x, dev, batch: int = 256) -> None:
    """Running statistics of the inserted BatchNorms re-measured with the current weights:
    a cumulative average over ``x`` in train mode, without gradient."""
    import torch
    bns = [module.norm(n) for n in module.normed()]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    module.train()
    with torch.no_grad():
        for i in range(0, len(x) - 1, batch):   # train-mode BatchNorm needs 2+ samples
            module.run({module.graph.inputs[0]: x[i:i + batch].to(dev)}, [])
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    module.eval()


def _row_norms(student, node_name: str):
    node = next(n for n in student.graph.nodes if n.name == node_name)
    from lcpc.torch_graph import weight_out_axis
    w = student.weight(node).detach()
    return w.transpose(0, weight_out_axis(node)).flatten(1).norm(dim=1)


def _rescale_rows(student, reference: dict) -> None:
    """Scale each normed layer's output rows back to their norms in ``reference``; its
    BatchNorm's running statistics scale along, so the function does not change."""
    import torch
    from lcpc.torch_graph import weight_out_axis
    by_name = {n.name: n for n in student.graph.nodes}
    with torch.no_grad():
        for node_name, ref in reference.items():
            node = by_name[node_name]
            now = _row_norms(student, node_name)
            s = torch.where(now > 0, ref / now.clamp_min(1e-12), torch.ones_like(now))
            w = student.const(node.inputs[1])
            shape = [1] * w.dim()
            shape[weight_out_axis(node)] = -1
            w.mul_(s.reshape(shape))
            bias = student.const(node.inputs[2])
            bias.mul_(s.reshape(bias.shape))
            bn = student.norm(node_name)
            bn.running_mean.mul_(s)
            bn.running_var.mul_(s * s)


# --------------------------------------------------------------------------- layer-wise refit
def _refit_samples(plan: Plan, most: int) -> int:
    flops = max(1, sum(plan.analysis.flops.values()))
    layers = max(1, len(plan.cut_nodes()))
    return int(min(most, max(128, REFIT_FLOP_BUDGET / (2 * flops * layers))))


def _refit(student, teacher, x, plan: Plan, dev, ridge: float) -> None:
    """Ridge-refit cut blocks and downstream dense layers, in graph order (module docstring, 1)."""
    g = student.graph
    affected: set[str] = set()
    for node in g.nodes:
        if node.name in student.masks or any(i in affected for i in node.inputs):
            affected.update(o for o in node.outputs if o)
    for node in g.nodes:
        b = plan.analysis.behaviours[node.name]
        if isinstance(b, ops.Dense) and (node.name in student.masks or node.inputs[0] in affected):
            layer = _Linearised.of(node, g)
            if layer is not None:
                _refit_node(student, teacher, x, plan, node, layer, dev, ridge)


@dataclass(frozen=True)
class _Linearised:
    """A Conv (2-D, group 1) or Gemm/MatMul as rows of inputs times a [in, out] matrix."""

    kind: str
    kernel: tuple[int, ...] = ()
    unfold: dict | None = None

    @staticmethod
    def of(node, g: Graph) -> "_Linearised | None":
        if node.op == "Conv":
            w = g.constants[node.inputs[1]]
            pads = list(node.attr("pads", [0] * 4))
            if w.ndim != 4 or pads[:2] != pads[2:] or node.attr("auto_pad", "NOTSET") not in ("NOTSET", ""):
                return None
            return _Linearised("conv", tuple(w.shape[2:]), dict(
                kernel_size=tuple(w.shape[2:]), dilation=tuple(node.attr("dilations", [1, 1])),
                padding=tuple(pads[:2]), stride=tuple(node.attr("strides", [1, 1]))))
        if len(g.info(node.inputs[0]).shape) != 2:
            return None
        if node.op == "Gemm":
            if node.attr("alpha", 1.0) != 1.0 or node.attr("beta", 1.0) != 1.0:
                return None
            return _Linearised("gemm_t" if node.attr("transB", 0) else "gemm")
        return _Linearised("gemm")

    def rows(self, x, channels):
        import torch.nn.functional as F
        if self.kind == "conv":
            cols = F.unfold(x[:, channels], **self.unfold)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return x[:, channels]

    def targets(self, y, channels):
        if self.kind == "conv":
            return y[:, channels].flatten(2).transpose(1, 2).reshape(-1, len(channels))
        return y[:, channels]

    def get(self, w, ii, oo):
        """The [in, out] matrix of block (ii, oo) of weight ``w``."""
        if self.kind == "conv":
            return w[oo][:, ii].reshape(len(oo), -1).T
        return w[oo][:, ii].T if self.kind == "gemm_t" else w[ii][:, oo]

    def put(self, w, ii, oo, m) -> None:
        if self.kind == "conv":
            w[oo[:, None], ii[None, :]] = m.T.reshape((len(oo), len(ii)) + self.kernel).to(w.dtype)
        elif self.kind == "gemm_t":
            w[oo[:, None], ii[None, :]] = m.T.to(w.dtype)
        else:
            w[ii[:, None], oo[None, :]] = m.to(w.dtype)


def _refit_node(student, teacher, x, plan: Plan, node, layer: _Linearised, dev, ridge: float) -> None:
    import torch
    g = student.graph
    c_in, c_out = g.info(node.inputs[0]).shape[1], g.info(node.outputs[0]).shape[1]
    if node.name in student.masks:
        in_b, out_b = plan.branches(node.inputs[0]), plan.branches(node.outputs[0])
        blocks = [(np.nonzero(in_b == k)[0], np.nonzero(out_b == k)[0]) for k in range(plan.k)]
    else:
        blocks = [(np.arange(c_in), np.arange(c_out))]
    per_in = int(np.prod(layer.kernel)) if layer.kernel else 1
    if max(len(ii) for ii, _ in blocks) * per_in + 1 > REFIT_MAX_DIM:
        return
    bias_name = node.inputs[2] if len(node.inputs) > 2 else ""
    has_bias = bias_name in g.constants and g.constants[bias_name].size == c_out
    positions = int(np.prod(g.info(node.outputs[0]).shape[2:]))
    batch = max(1, min(128, (1 << 18) // positions))
    blocks = [(torch.from_numpy(ii).to(dev), torch.from_numpy(oo).to(dev)) for ii, oo in blocks]
    sums: list[list] = [[0, 0] for _ in blocks]
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].to(dev)
            xs = student.run({g.inputs[0]: xb}, [node.inputs[0]])[node.inputs[0]]
            yt = teacher.run({g.inputs[0]: xb}, [node.outputs[0]])[node.outputs[0]]
            for acc, (ii, oo) in zip(sums, blocks):
                a = layer.rows(xs, ii)
                if has_bias:
                    a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype, device=a.device)], 1)
                acc[0] = acc[0] + (a.T @ a).double()
                acc[1] = acc[1] + (a.T @ layer.targets(yt, oo)).double()
        w = student.const(node.inputs[1]).data
        bias = student.const(bias_name).data.view(-1) if has_bias else None
        for (gram, cross), (ii, oo) in zip(sums, blocks):
            prior = layer.get(w, ii, oo).double()
            if has_bias:
                prior = torch.cat([prior, bias[oo].double()[None]], 0)
            lam = ridge * torch.diagonal(gram).mean().clamp_min(1e-12)
            eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
            solution = torch.linalg.solve(gram + lam * eye, cross + lam * prior)
            layer.put(w, ii, oo, solution[:len(solution) - int(has_bias)])
            if has_bias:
                bias[oo] = solution[-1].to(bias.dtype)


# --------------------------------------------------------------------------- distillation
def _distil(student, teacher, judge: _Judge, recipe: Recipe, x_all, y_all, train_idx, calib, name, dev,
            gen, progress):
    import torch
    import torch.nn.functional as F
    for node in student.normed():
        student.norm(node).momentum = recipe.bn_momentum
    x_train = torch.from_numpy(x_all[train_idx])
    y_train = torch.from_numpy(y_all[train_idx]) if y_all is not None else None
    batch = min(recipe.batch_size, len(x_train))
    steps = len(x_train) // batch                       # the last partial batch is dropped
    total = steps * recipe.epochs
    opt = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    warm = max(1, int(recipe.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    shift = recipe.max_shift if recipe.max_shift is not None else x_all.shape[-1] // 16
    temp, inp = recipe.temperature, student.graph.inputs[0]
    best = _Snapshot(student, judge.heldout_kl, 0)
    history, worse_in_a_row, stopped = [], 0, False
    for epoch in range(1, recipe.epochs + 1):
        student.train()
        order = torch.randperm(len(x_train), generator=gen)
        losses = []
        for step in range(1, steps + 1):
            idx = order[(step - 1) * batch:step * batch]
            xb = _augment(x_train[idx], recipe.augment, shift, gen).to(dev)
            with torch.no_grad():
                t = teacher.run({inp: xb}, [name])[name].flatten(1)
            s = student.run({inp: xb}, [name])[name].flatten(1)
            loss = F.kl_div(F.log_softmax(s / temp, 1), F.log_softmax(t / temp, 1), reduction="batchmean",
                            log_target=True) * temp * temp
            if y_train is not None and recipe.label_weight:
                loss = loss + recipe.label_weight * F.cross_entropy(s, y_train[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(epoch, step, steps, losses[-1], None)
        _recalibrate(student, calib, dev)
        fig = judge.figures(student)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **fig})
        if progress is not None:
            progress(epoch, steps, steps, history[-1]["loss"], _headline(fig).get("top1_agreement"))
        worse = best.significantly_better_than(judge.heldout_kl)
        if not worse and best.mean_kl() >= _mean(judge.heldout_kl):
            best = _Snapshot(student, judge.heldout_kl, epoch)
        worse_in_a_row = worse_in_a_row + 1 if worse else 0
        if worse_in_a_row >= recipe.patience:
            stopped = True
            break
    chosen = epoch if not worse_in_a_row else best.epoch
    if worse_in_a_row:
        best.restore(student)
    return history, steps * len(history), chosen, stopped


def _mean(kl) -> float:
    return float(kl.mean()) if kl is not None and len(kl) else 0.0


class _Snapshot:
    """A copy of the student's state with its per-sample held-out KL."""

    def __init__(self, student, kl, epoch: int) -> None:
        self.state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        self.kl, self.epoch = (None if kl is None else kl.copy()), epoch

    def mean_kl(self) -> float:
        return _mean(self.kl)

    def significantly_better_than(self, kl) -> bool:
        """Paired test: is ``kl`` worse than this snapshot's by more than two standard errors?"""
        if self.kl is None or kl is None or len(kl) < 2:
            return False
        d = kl - self.kl
        return float(d.mean()) > 2 * float(d.std(ddof=1)) / math.sqrt(len(d))

    def restore(self, student) -> None:
        student.load_state_dict(self.state)


def _augment(x, mode: str, shift: int, gen):
    """Shift each image by up to ``shift`` pixels per axis (zero fill) and/or mirror it."""
    import torch
    if mode == "none" or x.dim() != 4:
        return x
    n, _, h, w = x.shape
    if "shift" in mode and shift > 0:
        padded = torch.nn.functional.pad(x, (shift,) * 4)
        offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
    if "flip" in mode:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x
