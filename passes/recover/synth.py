"""Synthetic recovery data from the original model alone, when no training image is at hand
(ZeroQ, Cai et al. 2020; DeepInversion, Yin et al. 2020).

Inputs x are optimised (Adam, from Gaussian noise) so that the model's BatchNormalization layers
see the batch statistics they stored while it was trained, and so that the classifier assigns
each input its own target class, the targets spread evenly over the classes:

    L(x) = sum_l ( |mean_l(x) - m_l|_2 + |var_l(x) - v_l|_2 ) + ce * CE(f(x), y) + tv * TV(x)

over every located BatchNorm l (batch mean and variance per channel of the normalised input,
m_l and v_l its running statistics), with a random shift of the inputs at every iteration
(``jitter``) and the total variation TV as a smoothness prior. Each batch is optimised on its
own; the targets of a batch cycle through the classes, in a seeded order.

Guarantees:
- ``locate(graph, norms)`` finds the statistics in the folded graph: a ``frontend.FoldedNorm``
  names the Conv output that is the BatchNorm's affine image, whose batch statistics map back
  exactly (channels with a zero scale carry no statistics and are left out); a
  BatchNormalization the front end left in the graph is matched on its input; a model without
  any is refused (``LcpcError``) with what is missing and what to do;
- ``synthesise`` returns ``n`` float32 inputs of the model's input shape and a report (BatchNorm
  layers matched, loss at the start and end, iterations run, the share of inputs the model
  classifies as their targets, the classes it assigns, seconds); it is seeded, so the same call
  gives the same inputs on the CPU;
- the synthesis ends by ``time_limit`` seconds: the first ``TIMED`` iterations are timed and
  every batch gets the iterations that fit its equal share of the bound (its learning-rate
  schedule fitted to them), and a batch past its share stops (the report counts the iterations
  run and warns when the bound cut them); ``progress(done, total, loss)`` follows the iterations;
- values stay within ``bounds`` (the range the preprocessing can produce) when given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lcpc.errors import LcpcError
from lcpc.ir import Graph
from lcpc.passes.recover.judge import logits_tensor
from lcpc.passes.recover.torch_graph import GraphModule

Progress = Callable[[int, int, float | None], None]
TIMED = 5   # iterations timed before the rest are fitted to the time bound


@dataclass(frozen=True)
class Statistics:
    """What the batch statistics of ``tensor`` must be: after ``x = (tensor - shift) / scale``
    (per channel), mean ``mean`` and variance ``var`` on the channels ``keep``."""

    tensor: str
    mean: torch.Tensor
    var: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    keep: torch.Tensor

    def to(self, dev) -> Statistics:
        return Statistics(self.tensor, *(getattr(self, f).to(dev) for f in ("mean", "var", "scale", "shift", "keep")))


def locate(graph: Graph, norms: list, where: str) -> list[Statistics]:
    """The BatchNorm statistics of the model, on tensors of the folded ``graph``."""
    found = []
    produced = {o for n in graph.nodes for o in n.outputs if o}
    for norm in norms:
        if norm.tensor not in produced:
            continue
        a = norm.scale / np.sqrt(norm.var + norm.epsilon)    # tensor = a * x + (bias - a * mean)
        found.append(_statistics(norm.tensor, norm.mean, norm.var, a, norm.bias - a * norm.mean))
    for node in graph.nodes:    # BatchNormalization the front end could not fold (not after a Conv)
        if node.op == "BatchNormalization" and all(i in graph.constants for i in node.inputs[3:5]):
            mean, var = (graph.constants[i].astype(np.float64).reshape(-1) for i in node.inputs[3:5])
            found.append(_statistics(node.inputs[0], mean, var, np.ones_like(mean), np.zeros_like(mean)))
    if not found:
        raise LcpcError(f"{where}: has no BatchNormalization layer, so --data synth has no statistics to match "
                        f"(was BatchNorm folded into the convolutions at export?); export the model with "
                        f"BatchNorm kept (torch.onnx.export(..., do_constant_folding=False)), or pass real "
                        f"training images with --data")
    return found


def _statistics(tensor: str, mean, var, scale, shift) -> Statistics:
    keep = np.abs(scale) > 1e-8
    t = lambda v: torch.from_numpy(np.asarray(v, np.float64)).float()  # noqa: E731
    return Statistics(tensor, t(mean), t(var), t(np.where(keep, scale, 1.0)), t(shift), torch.from_numpy(keep))


def synthesise(graph: Graph, stats: list[Statistics], n: int, *, seed: int = 0, iterations: int = 500,
               batch: int = 256, lr: float = 0.1, ce: float = 1.0, tv: float = 1e-3, jitter: int | None = None,
               flip: bool = False, time_limit: float = 1800.0, bounds: tuple[float, float] | None = None,
               device: str | None = None, progress: Progress | None = None) -> tuple[np.ndarray, dict]:
    """``n`` synthetic inputs of ``graph``'s input shape and a report; see the module docstring."""
    if n < 1 or iterations < 1 or batch < 2:
        raise LcpcError(f"synthetic data: samples, iterations must be >= 1 and batch >= 2 (got {n}, {iterations}, "
                        f"{batch})")
    if not time_limit > 0:
        raise LcpcError(f"--synth-time {time_limit}: must be a positive number of seconds")
    start = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = GraphModule(graph).to(dev).eval()
    model.requires_grad_(False)
    name = logits_tensor(graph)
    shape = tuple(graph.info(graph.inputs[0]).shape[1:])
    classes = int(np.prod(graph.info(name).shape[1:]))
    side = shape[-1] if len(shape) >= 2 else 0
    shift = max(1, side // 8) if jitter is None and side >= 4 else (jitter or 0)
    targets = [s.to(dev) for s in stats]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen) % classes     # classes spread evenly, in a seeded order
    out = np.empty((n,) + shape, dtype=np.float32)
    sizes = [min(batch, n - i) for i in range(0, n, batch)]
    fit = {"iterations": iterations}    # cut to what fits the time bound once the first iterations are timed
    done, run, first, last = 0, [], [], []
    for b, size in enumerate(sizes):
        deadline = start + time_limit * (b + 1) / len(sizes)
        lo = b * batch
        x = torch.randn((size,) + shape, generator=gen).to(dev).requires_grad_(True)
        y = order[lo:lo + size].to(dev)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i / fit["iterations"], 1))))
        it, began = 0, time.perf_counter()
        for it in range(1, iterations + 1):
            xj = _jitter(x, shift, flip, gen)
            values = model.run({graph.inputs[0]: xj}, [s.tensor for s in targets] + [name])
            bn = torch.stack([_bn_loss(values[s.tensor], s) for s in targets]).sum()
            loss = bn + ce * F.cross_entropy(values[name].flatten(1), y) + tv * _total_variation(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bounds is not None:
                with torch.no_grad():
                    x.clamp_(*bounds)
            if it == 1:
                first.append(float(bn.detach()))
            done += 1
            if b == 0 and it == TIMED:  # every batch gets the iterations that fit its share of the bound
                per = (time.perf_counter() - began) / TIMED
                fit["iterations"] = max(TIMED, min(iterations, int(time_limit / len(sizes) / per)))
            if progress is not None:
                progress(done, fit["iterations"] * len(sizes), float(loss.detach()))
            if it >= fit["iterations"] or time.perf_counter() > deadline:
                break
        run.append(it)
        last.append(float(bn.detach()))
        out[lo:lo + size] = x.detach().cpu().numpy()
        done = fit["iterations"] * (b + 1)
    report = _report(model, name, out, order.numpy(), classes, dev, stats, run, iterations, first, last,
                     time.perf_counter() - start, time_limit, seed, dict(lr=lr, ce=ce, tv=tv, jitter=shift, flip=flip,
                                                                         batch=batch))
    return out, report


def _bn_loss(value: torch.Tensor, s: Statistics) -> torch.Tensor:
    v = value.transpose(0, 1).flatten(1)                      # channels x (batch * positions)
    x = (v - s.shift[:, None]) / s.scale[:, None]
    mean, var = x.mean(1), x.var(1, unbiased=False)
    return torch.linalg.vector_norm((mean - s.mean)[s.keep]) + torch.linalg.vector_norm((var - s.var)[s.keep])


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 4:
        return x.new_zeros(())
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _jitter(x: torch.Tensor, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    if x.dim() < 4:
        return x
    if shift:
        dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
        x = torch.roll(x, (dy, dx), (-2, -1))
    if flip and bool(torch.rand(1, generator=gen) < 0.5):
        x = x.flip(-1)
    return x


def _report(model, name, out, targets, classes, dev, stats, run, iterations, first, last, seconds, time_limit,
            seed, settings) -> dict:
    with torch.no_grad():
        preds = np.concatenate([model.run({model.graph.inputs[0]: torch.from_numpy(out[i:i + 256]).to(dev)},
                                          [name])[name].flatten(1).argmax(1).cpu().numpy()
                                for i in range(0, len(out), 256)])
    warnings = []
    if min(run) < iterations:
        warnings.append(f"the time bound ({time_limit:g} s) cut the synthesis: batches ran {min(run)} to {max(run)} "
                        f"of {iterations} iterations; raise --synth-time (or lower --synth-iterations) for "
                        f"better data")
    hit = float(np.mean(preds == targets))
    if hit < 0.9:
        warnings.append(f"the model classifies only {100 * hit:.1f}% of the synthetic inputs as their targets: "
                        f"more iterations (or a longer --synth-time) may help")
    return {"samples": len(out), "batches": len(run), "iterations": iterations,
            "iterations_run": {"min": int(min(run)), "mean": float(np.mean(run))},
            "batchnorm_layers": len(stats), "classes": classes,
            "batchnorm_loss": {"start": float(np.mean(first)), "end": float(np.mean(last))},
            "target_agreement": hit, "predicted_classes": int(len(np.unique(preds))),
            "seed": seed, "time_limit": time_limit, "seconds": round(seconds, 2), **settings, "warnings": warnings}
