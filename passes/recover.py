"""Recovery pass: distil the original model (teacher) into the cut plan (student).

Prototype with experiment knobs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from lcpc.errors import LcpcError
from lcpc.ir import Graph
from lcpc.plan import Plan

_EPOCH_HOOK = None
Progress = Callable[[int, int, int, float, float | None], None]


@dataclass(frozen=True)
class Recipe:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05
    temperature: float = 2.0
    label_weight: float = 0.5
    feature_weight: float = 0.0
    logit_mse: float = 0.0
    augment: str = "shift"
    max_shift: int | None = None
    patience: int = 3
    reestimate: bool = True
    recalibrate: bool = True
    norms: bool = True
    bn_momentum: float | None = 0.1
    calib_samples: int = 4096
    refit: bool = False
    refit_samples: int = 1024
    ridge: float = 1e-3
    rescale: bool = True
    refit_all: bool = True


def _torch():
    try:
        import torch
    except ImportError:
        raise LcpcError("recovery needs PyTorch: pip install 'lcpc[train]'") from None
    return torch


def run(plan: Plan, data: np.ndarray, labels: np.ndarray | None = None, *, epochs: int = 2,
        batch_size: int = 32, lr: float = 1e-3, holdout: float = 0.1, seed: int = 0,
        progress: Progress | None = None, device: str | None = None, augment: str = "shift",
        **knobs) -> tuple[Plan, dict]:
    torch = _torch()
    from lcpc.passes.cut import weight_masks
    from lcpc.torch_graph import GraphModule, normable

    recipe = Recipe(epochs=epochs, batch_size=batch_size, lr=lr, augment=augment, **knobs)
    start = time.perf_counter()
    g = plan.graph
    x_all, y_all = _check_data(g, data, labels)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(x_all)
    order = rng.permutation(n)
    n_hold = int(round(holdout * n)) if holdout > 0 else 0
    n_hold = min(max(n_hold, 1 if holdout > 0 else 0), n - 1)
    hold_idx, train_idx = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    x = torch.from_numpy(x_all)
    logits_name = _logits_tensor(g)

    teacher = GraphModule(g).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t_logits = _predict(teacher, x, logits_name, dev)
    t_top = t_logits.argmax(1)

    norms = [name for name in normable(g) if name not in plan.analysis.terminal] if recipe.norms else []
    student = GraphModule(g, weight_masks(plan), norms).to(dev)
    calib = torch.from_numpy(x_all[train_idx[rng.permutation(len(train_idx))[:recipe.calib_samples]]])
    stages = {}

    def measure(tag: str) -> dict:
        s_logits = _predict(student, x, logits_name, dev)
        top = s_logits.argmax(1)
        kl = torch.nn.functional.kl_div(torch.log_softmax(s_logits, 1), torch.log_softmax(t_logits, 1),
                                        reduction="none", log_target=True).sum(1)
        fig = {"train_agreement": float((top[train_idx] == t_top[train_idx]).float().mean()),
               "heldout_agreement": float((top[hold_idx] == t_top[hold_idx]).float().mean()) if n_hold else None,
               "train_kl": float(kl[train_idx].mean()), "heldout_kl": float(kl[hold_idx].mean()) if n_hold else None,
               "heldout_kl_se": float(kl[hold_idx].std() / math.sqrt(n_hold)) if n_hold > 1 else 0.0}
        if y_all is not None:
            yt = torch.from_numpy(y_all)
            fig["train_accuracy"] = float((top[train_idx] == yt[train_idx]).float().mean())
            if n_hold:
                fig["heldout_accuracy"] = float((top[hold_idx] == yt[hold_idx]).float().mean())
        stages[tag] = fig
        return fig

    with student.norms_off():
        measure("cut")
        ref_norms = {n: _row_norms(student, n) for n in norms}
        if recipe.refit:
            _refit(student, teacher, calib[:recipe.refit_samples], plan, dev, recipe.ridge, classifier=recipe.refit_all)
            measure("refit")
        stats = _channel_stats(student, calib, norms, dev)
    student.init_norms_identity(stats)
    if recipe.refit and recipe.rescale:
        _rescale(student, ref_norms)
    if recipe.reestimate and norms:
        t_stats = _channel_stats(teacher, calib, norms, dev)
        with torch.no_grad():
            for name in norms:
                bn = student.norm(name)
                bn.weight.copy_(torch.sqrt(t_stats[name][1] + bn.eps))
                bn.bias.copy_(t_stats[name][0])
        _recalibrate(student, calib, dev)
        measure("bn_reestimated")
    for name in norms:
        student.norm(name).momentum = recipe.bn_momentum

    history = []
    fig0 = stages[list(stages)[-1]]
    best = (_score(fig0), {k: v.detach().clone() for k, v in student.state_dict().items()}, 0)
    floor = (-_score(fig0), fig0["heldout_kl_se"], 0)
    steps_per_epoch = math.ceil(len(train_idx) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    warm = max(1, int(recipe.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    xt = torch.from_numpy(x_all[train_idx])
    yt = torch.from_numpy(y_all[train_idx]) if y_all is not None else None
    feat_names = [g_node_out(g, nm) for nm in norms] if recipe.feature_weight else []
    shift = recipe.max_shift if recipe.max_shift is not None else max(1, x_all.shape[-1] // 16)
    epochs_run = 0
    for epoch in range(recipe.epochs):
        student.train()
        perm = torch.randperm(len(xt), generator=gen)
        losses = []
        for step in range(steps_per_epoch):
            idx = perm[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            xb = _augment(xt[idx], recipe.augment, shift, gen).to(dev)
            want = [logits_name] + feat_names
            with torch.no_grad():
                tout = teacher.run({g.inputs[0]: xb}, want)
            sout = student.run({g.inputs[0]: xb}, want)
            s, t = sout[logits_name].flatten(1), tout[logits_name].flatten(1)
            T = recipe.temperature
            loss = torch.nn.functional.kl_div(torch.log_softmax(s / T, 1), torch.log_softmax(t / T, 1),
                                              reduction="batchmean", log_target=True) * T * T
            if recipe.logit_mse:
                loss = loss + recipe.logit_mse * ((s - t) ** 2).mean()
            if recipe.feature_weight:
                fl = 0
                for fn in feat_names:
                    tf = tout[fn]
                    var = tf.transpose(0, 1).flatten(1).var(1).clamp_min(1e-6)
                    shape = (1, -1) + (1,) * (tf.dim() - 2)
                    fl = fl + (((sout[fn] - tf) ** 2) / var.reshape(shape)).mean()
                loss = loss + recipe.feature_weight * fl / len(feat_names)
            if yt is not None and recipe.label_weight:
                loss = loss + recipe.label_weight * torch.nn.functional.cross_entropy(s, yt[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(epoch, step, steps_per_epoch, float(loss), None)
        student.eval()
        if recipe.recalibrate:
            _recalibrate(student, calib, dev)
        fig = measure(f"epoch{epoch + 1}")
        if _EPOCH_HOOK is not None:
            fig.update(_EPOCH_HOOK(student))
        epochs_run = epoch + 1
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **fig})
        if progress is not None:
            progress(epoch, steps_per_epoch, steps_per_epoch, float(np.mean(losses)), fig["heldout_agreement"])
        kl_now = -_score(fig)
        if kl_now <= floor[0] + floor[1]:
            best = (_score(fig), {k: v.detach().clone() for k, v in student.state_dict().items()}, epoch + 1)
        if kl_now < floor[0]:
            floor = (kl_now, fig["heldout_kl_se"], epoch + 1)
        elif epoch + 1 - floor[2] >= recipe.patience:
            break
    student.load_state_dict(best[1])
    student.eval()
    constants = student.export_constants()
    new_graph = Graph(g.nodes, g.inputs, g.outputs, g.tensors, constants, g.opset, g.extra_opsets, g.name)
    final = measure("recovered")
    report = {"recipe": asdict(recipe), "epochs_run": epochs_run, "best_epoch": best[2], "history": history,
              "stages": stages, "samples": {"train": len(train_idx), "heldout": n_hold},
              "seconds": time.perf_counter() - start, "device": str(dev), "warnings": []}
    return replace(plan, graph=new_graph), report


def g_node_out(g, name):
    return next(n.outputs[0] for n in g.nodes if n.name == name)


def _score(fig: dict) -> float:
    return -(fig["heldout_kl"] if fig["heldout_kl"] is not None else fig["train_kl"])


def _check_data(g: Graph, data, labels):
    if len(g.inputs) != 1:
        raise LcpcError(f"recovery handles single-input models; this one has inputs {', '.join(g.inputs)}")
    data = np.asarray(data)
    want = g.info(g.inputs[0]).shape
    if data.ndim != len(want) or tuple(data.shape[1:]) != tuple(want[1:]):
        raise LcpcError(f"--data has shape {data.shape}; the model's input '{g.inputs[0]}' needs "
                        f"[N, {', '.join(map(str, want[1:]))}]")
    if len(data) < 2:
        raise LcpcError("--data holds fewer than 2 samples; recovery needs training images")
    y = None
    if labels is not None:
        y = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(y) != len(data):
            raise LcpcError(f"--labels holds {len(y)} labels for {len(data)} samples")
    return np.ascontiguousarray(data, dtype=np.float32), y


def _logits_tensor(g: Graph) -> str:
    out = g.outputs[0]
    p = g.producer(out)
    if p is not None and p.op in ("Softmax", "LogSoftmax"):
        return p.inputs[0]
    return out


def _predict(module, x, name, dev, batch: int = 256):
    import torch
    was = module.training
    module.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].to(dev)
            outs.append(module.run({module.graph.inputs[0]: xb}, [name])[name].flatten(1).cpu())
    module.train(was)
    return torch.cat(outs)


def _channel_stats(module, x, nodes, dev, batch: int = 256):
    import torch
    g = module.graph
    outs = {n.name: n.outputs[0] for n in g.nodes if n.name in set(nodes)}
    sums, sq, count = {}, {}, {}
    module.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            vals = module.run({g.inputs[0]: x[i:i + batch].to(dev)}, list(outs.values()))
            for node, t in outs.items():
                v = vals[t].double().transpose(0, 1).flatten(1)
                sums[node] = sums.get(node, 0) + v.sum(1)
                sq[node] = sq.get(node, 0) + (v * v).sum(1)
                count[node] = count.get(node, 0) + v.shape[1]
    stats = {}
    for node in outs:
        mean = sums[node] / count[node]
        var = (sq[node] / count[node] - mean * mean).clamp_min(0)
        stats[node] = (mean.float(), var.float())
    return stats


def _recalibrate(module, x, dev, batch: int = 256):
    """Running statistics of every inserted BatchNorm re-measured as a cumulative average
    over ``x`` with the current weights (train-mode forward, no gradient)."""
    import torch
    bns = [module.norm(n) for n in module.normed()]
    if not bns:
        return
    moms = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    module.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            module.run({module.graph.inputs[0]: x[i:i + batch].to(dev)}, [])
    for bn, m in zip(bns, moms):
        bn.momentum = m
    module.eval()


def _augment(x, mode: str, shift: int, gen):
    import torch
    if mode == "none" or x.dim() != 4:
        return x
    n, c, h, w = x.shape
    if "shift" in mode and shift > 0:
        padded = torch.nn.functional.pad(x, (shift,) * 4)
        d = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(d)])
    if "flip" in mode:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def _refit(student, teacher, x, plan, dev, ridge, batch=256, classifier=True):
    import torch
    import torch.nn.functional as F
    from lcpc import ops
    g = student.graph
    affected = set()
    for node in g.nodes:
        if node.name in student.masks or any(i in affected for i in node.inputs):
            affected.update(o for o in node.outputs if o)
    for node in g.nodes:
        b = plan.analysis.behaviours[node.name]
        if not isinstance(b, ops.Dense) or node.op == "ConvTranspose":
            continue
        if node.name not in student.masks and not (node.inputs[0] in affected and classifier):
            continue
        if node.op == "Conv":
            pads = list(node.attr("pads", [0] * 4))
            if len(g.info(node.inputs[1]).shape) != 4 or pads[:2] != pads[2:] or \
                    node.attr("auto_pad", "NOTSET") not in ("NOTSET", ""):
                continue
        elif node.op == "Gemm" and (node.attr("alpha", 1.0) != 1.0 or node.attr("beta", 1.0) != 1.0):
            continue
        elif g.info(node.inputs[0]).shape.__len__() != 2:
            continue
        w = student.const(node.inputs[1])
        has_bias = len(node.inputs) > 2 and node.inputs[2] in g.constants and \
            g.constants[node.inputs[2]].size == g.info(node.outputs[0]).shape[1]
        if node.name in student.masks:
            in_b, out_b = plan.branches(node.inputs[0]), plan.branches(node.outputs[0])
            blocks = [(np.nonzero(in_b == k)[0], np.nonzero(out_b == k)[0]) for k in range(plan.k)]
        else:
            blocks = [(np.arange(g.info(node.inputs[0]).shape[1]), np.arange(g.info(node.outputs[0]).shape[1]))]
        if node.op == "Conv":
            kh, kw = w.shape[2:]
            conv_kw = dict(kernel_size=(kh, kw), dilation=tuple(node.attr("dilations", [1, 1])),
                           padding=tuple(pads[:2]), stride=tuple(node.attr("strides", [1, 1])))
            rows = lambda t, ii: F.unfold(t[:, ii], **conv_kw).transpose(1, 2).reshape(-1, len(ii) * kh * kw)
            outs = lambda t, oo: t[:, oo].flatten(2).transpose(1, 2).reshape(-1, len(oo))
            d_in = kh * kw
        else:
            rows = lambda t, ii: t[:, ii]
            outs = lambda t, oo: t[:, oo]
            d_in = 1
        if max(len(ii) for ii, _ in blocks) * d_in > 4096:
            continue
        acc = {}
        with torch.no_grad():
            for i in range(0, len(x), batch):
                xb = x[i:i + batch].to(dev)
                xs = student.run({g.inputs[0]: xb}, [node.inputs[0]])[node.inputs[0]]
                yt = teacher.run({g.inputs[0]: xb}, [node.outputs[0]])[node.outputs[0]]
                for k, (ii, oo) in enumerate(blocks):
                    a = rows(xs, ii).double()
                    if has_bias:
                        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype, device=a.device)], 1)
                    y = outs(yt, oo).double()
                    G, H = acc.get(k, (0, 0))
                    acc[k] = (G + a.T @ a, H + a.T @ y)
            bias = student.const(node.inputs[2]) if has_bias else None
            for k, (G, H) in acc.items():
                ii, oo = blocks[k]
                oi, ij = torch.from_numpy(oo).to(w.device), torch.from_numpy(ii).to(w.device)
                if node.op == "Conv":
                    w0 = w[oi][:, ij].reshape(len(oo), -1).double().T
                elif node.op == "Gemm" and node.attr("transB", 0):
                    w0 = w[oi][:, ij].double().T
                else:
                    w0 = w[ij][:, oi].double()
                prior = w0
                if has_bias:
                    prior = torch.cat([w0, bias.reshape(-1)[oi].double()[None]], 0)
                lam = ridge * torch.diagonal(G).mean()
                sol = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype, device=G.device), H + lam * prior)
                wb = sol[:len(w0)]
                if node.op == "Conv":
                    w.data[oi[:, None], ij[None, :]] = wb.T.reshape(len(oo), len(ii), *w.shape[2:]).float()
                elif node.op == "Gemm" and node.attr("transB", 0):
                    w.data[oi[:, None], ij[None, :]] = wb.T.float()
                else:
                    w.data[ij[:, None], oi[None, :]] = wb.float()
                if has_bias:
                    flat = bias.data.view(-1)
                    flat[oi] = sol[-1].float()


def _row_norms(student, name):
    node = next(n for n in student.graph.nodes if n.name == name)
    w = student.weight(node).detach()
    return w.flatten(1).norm(dim=1) if node.op == "Conv" else None


def _rescale(student, ref):
    import torch
    with torch.no_grad():
        for node in student.graph.nodes:
            if node.name not in ref or ref[node.name] is None:
                continue
            w = student.const(node.inputs[1])
            now = (student.weight(node)).flatten(1).norm(dim=1)
            s = torch.where(now > 0, ref[node.name] / now.clamp_min(1e-12), torch.ones_like(now))
            w.mul_(s.reshape(-1, 1, 1, 1))
            b = student.const(node.inputs[2])
            b.mul_(s)
            bn = student.norm(node.name)
            bn.running_mean.mul_(s)
            bn.running_var.mul_(s * s)
