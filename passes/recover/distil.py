"""Recovery pass: distil the original model (teacher) into the cut plan (student).

Guarantees:
- the returned plan differs from the input only in its graph's constants: nodes,
  tensors, layouts, partition and decisions are unchanged, so lowering it yields the
  same stages and the same bytes per inference;
- cut layers stay cut: the student (``student.Student``) trains ``W * mask``
  (``lcpc.weights.weight_masks``), exported weights are exactly zero outside the blocks,
  so the lowered plan computes what the trained student computes (in eval mode);
- the student starts from the plan's weights as they are (after ``passes.recover.refit``, the
  one refit, when the pipeline ran it); the teacher is ``original`` (the weights before
  any refit) or, when not given, the plan's own graph;
- ``data`` is split with ``lcpc.fidelity.holdout_split`` (the refit's split for the
  same seed); the report gives top-1 agreement with the original (and accuracy with
  labels) on both parts, before and after, and warns when the held-out figure trails
  the training figure (overfitting) or the data set is small (``judge``).

Recipe (``benchmarks/recovery.py`` measures it on the digits and shapes examples):
1. *BatchNorm re-insertion* (``norms``): a BatchNorm after every
   non-classifier Conv/Gemm with a bias, initialised to the identity, then
   re-estimated toward the original's output statistics.
2. *Distillation*: KL(softmax(t/T) || softmax(s/T)) * T^2 with T = 4 on the same
   (optionally shifted/flipped) batch for teacher and student, plus cross-entropy on
   labels when given; AdamW (learning rate 2e-3) on batches of 8 (recovery data are
   few: small batches give more steps in the same epochs), a linear warm-up over 5% of
   the steps then cosine decay (chosen on shapes at K=8 over batches of 32, learning rate
   1e-3, T = 2 and 20% warm-up: docs/results.md); BatchNorm trains on
   batch statistics with momentum-updated running statistics, re-measured over the
   calibration images before every evaluation.
   *Batch augmentation* (Hoffer et al. 2019): each step holds ``views`` independently
   augmented copies of each of its images, so the same steps over the same data see
   ``views`` times the samples, at ``views`` times the compute. Where recovery data are few,
   the student is bound by the samples it sees, not by its steps: on shapes at K=8 it
   underfits (training agreement stays close to held-out at every epoch, and batches of
   4, twice the steps, do not help), and 4 views there (with learning rate 1e-2
   and mirroring) reach in 2 epochs about what one view reaches in 8 to 10. One view is the
   default: on digits, 4 views at T = 4 gain nothing (``benchmarks/results/recovery_curve.md``
   has the 3-seed runs).
   The start matters as well: on shapes at K=8 with 4 views, distilling from the ``stats``
   refit (the kept blocks of the original, output statistics matched) instead of the
   least-squares one ends 0.1 point higher on average and 0.4 on the worst of 3 seeds
   (``benchmarks/results/recovery_curve.md``).
3. *Model selection*: after each epoch the held-out KL is compared, sample by sample,
   with the best epoch's; the latest epoch is kept unless it is worse by more than
   two standard errors (then the best is restored); two such epochs in a row stop
   training early.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from lcpc.errors import LcpcError
from lcpc.fidelity import holdout_split, lower_by_two_se
from lcpc.ir import Graph
from lcpc.passes.recover.judge import (
    Judge,
    already_cut,
    check_data,
    data_warnings,
    headline,
    logits_tensor,
    result_warnings,
    same_structure,
)
from lcpc.plan import Plan
from lcpc.weights import dense_nodes, weight_masks

Progress = Callable[[int, int, int, float, float | None], None]
MAX_TRAIN_EVAL = 2048
# the Recipe fields a user sets (CLI options of the same names), with the range each must lie in:
# whole numbers from low to high, or reals above low up to high (a larger learning rate or temperature
# only diverges: the loss carries T**2, and every weight becomes NaN)
WHOLE_RANGES = {"epochs": (0, 10_000), "batch_size": (1, 65_536), "views": (1, 64)}
REAL_RANGES = {"lr": (0.0, 1.0), "temperature": (0.0, 100.0)}
OPTIONS = {"epochs", "views", "lr", "temperature"}  # fields `lcpc recover` sets by an option of the same name


@dataclass(frozen=True)
class Recipe:
    """Every knob of a distillation run; the report records the one used."""

    epochs: int = 2
    batch_size: int = 8            # small batches: more steps in the same epochs (recovery data are few)
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: float = 0.05           # fraction of the steps with a linear warm-up
    temperature: float = 4.0
    label_weight: float = 0.5      # weight of cross-entropy on labels, when given
    augment: str = "shift"         # none | shift | shift+flip | flip
    max_shift: int | None = None   # pixels; None: a 16th of the image side
    patience: int = 2
    calib_samples: int = 1024
    bn_momentum: float = 0.1
    views: int = 1                 # augmented copies of every image in a step (batch augmentation)

    def __post_init__(self) -> None:
        """Every field a user sets in its range (``WHOLE_RANGES``, ``REAL_RANGES``); the error names
        the field and the CLI option of the same name."""
        for name, (low, high) in WHOLE_RANGES.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise LcpcError(f"recovery: {name} {value!r} must be a whole number from {low} to {high}"
                                + (f" (--{name})" if name in OPTIONS else ""))
        for name, (above, most) in REAL_RANGES.items():
            value = getattr(self, name)
            real = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not real or not above < value <= most:  # NaN fails the comparison too
                raise LcpcError(f"recovery: {name} {value!r} must be a number above {above:g} and at most {most:g}"
                                + (f" (--{name})" if name in OPTIONS else ""))
        if self.augment not in ("none", "shift", "flip", "shift+flip"):
            raise LcpcError(f"recovery: augment '{self.augment}': choose none, shift, flip or shift+flip")


def _torch():
    try:
        import torch
    except ImportError:
        raise LcpcError("distillation needs PyTorch: pip install 'lcpc[train]' (or recover with --epochs 0: "
                        "the least-squares refit alone needs no PyTorch)") from None
    return torch


def run(plan: Plan, data: np.ndarray, labels: np.ndarray | None = None, *, epochs: int = 2,
        batch_size: int = 8, lr: float = 2e-3, holdout: float = 0.1, seed: int = 0,
        progress: Progress | None = None, device: str | None = None, augment: str = "shift",
        original: Graph | None = None, **recipe_overrides) -> tuple[Plan, dict]:
    """Distil the original model into the cut plan on ``data``; see the module docstring.

    ``recipe_overrides`` sets any other :class:`Recipe` field (``temperature``,
    ``max_shift``, ...). ``progress(epoch, step, steps, loss, heldout_agreement)`` is
    called after every step (1-based epoch and step, agreement None) and once more at
    the end of each epoch (step == steps, agreement measured). Returns the new plan and
    a report.
    """
    try:
        recipe = Recipe(epochs=epochs, batch_size=batch_size, lr=lr, augment=augment, **recipe_overrides)
    except TypeError as exc:
        raise LcpcError(f"recovery: {exc} (settings: {', '.join(Recipe.__dataclass_fields__)})") from None
    torch = _torch()
    from lcpc.passes.recover.norms import initialise
    from lcpc.passes.recover.student import Student, normable
    from lcpc.passes.recover.torch_graph import GraphModule

    start = time.perf_counter()
    g = plan.graph
    x_all, y_all = check_data(g, data, labels)
    train_idx, hold_idx = holdout_split(len(x_all), holdout, seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    train_eval = np.sort(rng.permutation(train_idx)[:MAX_TRAIN_EVAL])
    calib = torch.from_numpy(x_all[rng.permutation(train_idx)[:recipe.calib_samples]])
    name = logits_tensor(g)
    masks = weight_masks(plan)
    warnings = data_warnings(len(x_all), len(hold_idx), masks)

    if original is None and masks and already_cut(g, masks):
        raise LcpcError("recovery: the plan's weights are already cut (an earlier pass zeroed the cross-branch "
                        "weights), so they cannot teach; pass original=<the graph with the original weights>")
    original = same_structure(original, g) if original is not None else g
    teacher = GraphModule(original).to(dev).eval()
    teacher.requires_grad_(False)
    norms = [n for n in normable(g) if n not in plan.analysis.terminal]
    views = {n.name: v.out_axis for n, v in dense_nodes(g, plan.analysis.behaviours)}
    student = Student(g, masks, norms, {n: views.get(n, 0) for n in norms}).to(dev)
    judge = Judge(teacher, name, x_all, y_all, train_eval, hold_idx, dev)
    stages: dict[str, dict] = {}

    with student.norms_off():
        stages["start"] = judge.figures(student)
    history, steps_run, best_epoch, stopped = [], 0, 0, False
    if masks:
        initialise(student, teacher, original, calib, dev)
        if norms:
            stages["bn_reestimated"] = judge.figures(student)
        if recipe.epochs:
            history, steps_run, best_epoch, stopped = _distil(student, teacher, judge, recipe, x_all, y_all,
                                                              train_idx, calib, name, dev, gen, progress)
        student.eval()
        stages["recovered"] = judge.figures(student)
        g = g.copy(constants=student.export_constants())
    else:
        stages["recovered"] = stages["start"]
    warnings += result_warnings(stages["recovered"])
    report = {
        "before": headline(stages["start"]), "after": headline(stages["recovered"]),
        "recipe": asdict(recipe), "holdout": holdout, "seed": seed, "device": str(dev),
        "samples": {"train": len(train_idx), "heldout": len(hold_idx)},
        "teacher": judge.teacher_figures(),
        "stages": stages, "history": history,
        "epochs_run": len(history), "steps": steps_run, "best_epoch": best_epoch, "stopped_early": stopped,
        "seconds": round(time.perf_counter() - start, 2), "warnings": warnings,
    }
    return replace(plan, graph=g), report


# --------------------------------------------------------------------------- distillation
def _distil(student, teacher, judge, recipe: Recipe, x_all, y_all, train_idx, calib, name, dev,
            gen, progress):
    import torch
    import torch.nn.functional as F

    from lcpc.passes.recover.norms import recalibrate

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
            xb = torch.cat([_augment(x_train[idx], recipe.augment, shift, gen) for _ in range(recipe.views)]).to(dev)
            with torch.no_grad():
                t = teacher.run({inp: xb}, [name])[name].flatten(1)
            s = student.run({inp: xb}, [name])[name].flatten(1)
            loss = F.kl_div(F.log_softmax(s / temp, 1), F.log_softmax(t / temp, 1), reduction="batchmean",
                            log_target=True) * temp * temp
            if y_train is not None and recipe.label_weight:
                loss = loss + recipe.label_weight * F.cross_entropy(s, y_train[idx].repeat(recipe.views).to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(epoch, step, steps, losses[-1], None)
        recalibrate(student, calib, dev)
        fig = judge.figures(student)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **fig})
        if progress is not None:
            progress(epoch, steps, steps, history[-1]["loss"], headline(fig).get("top1_agreement"))
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
        return lower_by_two_se(self.kl, kl)

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
