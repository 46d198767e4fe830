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
3. *Branch dropout* (``branch_dropout`` P, ``lcpc recover --branch-dropout``; off by default):
   in each step, per image, every non-head branch is dropped at the layers merged at the head
   with probability P, the kept branches' inputs rescaled as ``lcpc.runtime.degrade`` rescales
   them (``Student.dropping``), so the model is trained for the answers it gives with a device
   missing (``lcpc run/verify --without``). On shapes at K=4, P = 0.25 brings the accuracy with
   one device missing from 85.7% to 87.7% (worst device and seed: 83.0% to 86.7%) for 0.6 point
   with every device present; on digits the recovered model keeps its accuracy with a device
   missing without it (the rescale alone: 98.8% against 99.3%)
   (``benchmarks/results/branch_dropout*.md``).
4. *Model selection*: after each epoch the held-out KL is compared, sample by sample,
   with the best epoch's; the latest epoch is kept unless it is worse by more than
   two standard errors (then the best is restored); two such epochs in a row stop
   training early.

At scale (``Execution``): the data are ``samples.Samples`` read a batch at a time (a memory-mapped
``.npy``, an image folder through data-loader workers), so memory does not grow with their
number; the epochs (``epochs.Trainer``) run in this process, in ``procs`` data-parallel processes
lcpc starts (``launch.spawn``: gloo on the CPU, NCCL with one GPU each) or in those torchrun
started, with mixed precision on GPUs; a checkpoint folder keeps the trainer's whole state after
every epoch and on Ctrl-C, and ``resume`` continues from it exactly. The set-up (BatchNorm
re-insertion, the start figures) and the final figures and export run in this process; a worker
process rebuilds the teacher and the student from the plan and the set-up's weights.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from lcpc.errors import LcpcError
from lcpc.fidelity import holdout_split
from lcpc.ir import Graph
from lcpc.passes.recover.checkpoint import Checkpoint, fingerprint
from lcpc.passes.recover.judge import (
    MAX_TRAIN_EVAL,
    Judge,
    already_cut,
    data_warnings,
    headline,
    logits_tensor,
    result_warnings,
    same_structure,
)
from lcpc.passes.recover.samples import Samples, as_samples, check
from lcpc.plan import Action, Plan
from lcpc.weights import dense_nodes, weight_masks

Progress = Callable[[int, int, int, float, float | None], None]
DEVICES = ("auto", "cpu", "cuda")
# the Recipe fields a user sets (CLI options of the same names), with the range each must lie in:
# whole numbers from low to high, or reals above low up to high (a larger learning rate or temperature
# only diverges: the loss carries T**2, and every weight becomes NaN)
WHOLE_RANGES = {"epochs": (0, 10_000), "batch_size": (1, 65_536), "views": (1, 64)}
REAL_RANGES = {"lr": (0.0, 1.0), "temperature": (0.0, 100.0)}
# set by `lcpc recover` options of the same name
OPTIONS = {"epochs", "views", "lr", "temperature", "batch_size", "branch_dropout"}


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
    precision: str = "auto"        # auto (bf16/fp16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16 | fp16
    branch_dropout: float = 0.0    # probability of dropping each non-head branch at the merge, per sample

    def __post_init__(self) -> None:
        """Every field a user sets in its range (``WHOLE_RANGES``, ``REAL_RANGES``); the error names
        the field and the CLI option of the same name."""
        for name, (low, high) in WHOLE_RANGES.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise LcpcError(f"recovery: {name} {value!r} must be a whole number from {low} to {high}"
                                + (f" (--{name.replace('_', '-')})" if name in OPTIONS else ""))
        for name, (above, most) in REAL_RANGES.items():
            value = getattr(self, name)
            real = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not real or not above < value <= most:  # NaN fails the comparison too
                raise LcpcError(f"recovery: {name} {value!r} must be a number above {above:g} and at most {most:g}"
                                + (f" (--{name.replace('_', '-')})" if name in OPTIONS else ""))
        p = self.branch_dropout
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
            raise LcpcError(f"recovery: branch_dropout {p!r} must be a number from 0 up to (not including) 1 "
                            f"(--branch-dropout)")
        if self.augment not in ("none", "shift", "flip", "shift+flip"):
            raise LcpcError(f"recovery: augment '{self.augment}': choose none, shift, flip or shift+flip")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise LcpcError(f"recovery: precision '{self.precision}': choose auto, fp32, bf16 or fp16")


@dataclass(frozen=True)
class Execution:
    """Where and how the distillation runs (not what it computes: that is the ``Recipe``).

    ``device``: auto (CUDA when PyTorch sees a GPU), cpu or cuda; ``procs``: data-parallel
    processes (one GPU each on CUDA); ``workers``: data-loader processes per training process
    (None: up to 4 for image folders, which are decoded; 0 for arrays and memory-mapped files);
    ``timeout``: seconds any wait between processes may take; ``checkpoint``: a folder for the
    trainer's state after every epoch and on Ctrl-C; ``resume``: continue from it."""

    device: str = "auto"
    procs: int = 1
    workers: int | None = None
    timeout: float = 600.0
    checkpoint: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise LcpcError(f"--train-device {self.device}: choose one of {', '.join(DEVICES)}")
        if self.procs < 1:
            raise LcpcError(f"--procs {self.procs}: must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise LcpcError(f"--workers {self.workers}: must be 0 or more")
        if not self.timeout > 0:
            raise LcpcError(f"--timeout {self.timeout}: must be a positive number of seconds")
        if self.resume and not self.checkpoint:
            raise LcpcError("--resume continues from a --checkpoint folder; pass --checkpoint DIR too")

    def device_kind(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def workers_for(self, samples: Samples) -> int:
        if self.workers is not None:
            return self.workers
        from lcpc.passes.recover.samples import ImageFolderSamples
        if not isinstance(samples, ImageFolderSamples):
            return 0
        return min(4, max(1, (os.cpu_count() or 1) // self.procs - 1))


def _torch():
    try:
        import torch
    except ImportError:
        raise LcpcError("distillation needs PyTorch: pip install 'lcpc[train]' (or recover with --epochs 0: "
                        "the least-squares refit alone needs no PyTorch)") from None
    return torch


def run(plan: Plan, data: Samples | np.ndarray, labels: np.ndarray | None = None, *, epochs: int = 2,
        batch_size: int = 8, lr: float = 2e-3, holdout: float = 0.1, seed: int = 0,
        progress: Progress | None = None, device: str | None = None, augment: str = "shift",
        original: Graph | None = None, execution: Execution | None = None,
        **recipe_overrides) -> tuple[Plan, dict]:
    """Distil the original model into the cut plan on ``data``; see the module docstring.

    ``recipe_overrides`` sets any other :class:`Recipe` field (``temperature``,
    ``max_shift``, ...); ``execution`` says where it runs (``device``, a torch device name, overrides
    its device). ``progress(epoch, step, steps, loss, heldout_agreement)`` is
    called after every step (1-based epoch and step, agreement None) and once more at
    the end of each epoch (step == steps, agreement measured). Returns the new plan and
    a report.
    """
    try:
        recipe = Recipe(epochs=epochs, batch_size=batch_size, lr=lr, augment=augment, **recipe_overrides)
    except TypeError as exc:
        raise LcpcError(f"recovery: {exc} (settings: {', '.join(Recipe.__dataclass_fields__)})") from None
    execution = execution or Execution()
    torch = _torch()
    from lcpc.passes.recover import launch
    from lcpc.passes.recover.loader import Batches
    from lcpc.passes.recover.norms import initialise
    from lcpc.passes.recover.student import Student, normable
    from lcpc.passes.recover.torch_graph import GraphModule

    start = time.perf_counter()
    g = plan.graph
    if len(g.inputs) != 1:
        raise LcpcError(f"recovery handles single-input models; this one has inputs {', '.join(g.inputs)}")
    samples = as_samples(data)
    y_all = check(samples, g.inputs[0], g.info(g.inputs[0]).shape, labels)
    train_idx, hold_idx = holdout_split(len(samples), holdout, seed)
    torchrun = launch.torchrun_rank()
    if torchrun is not None and execution.procs not in (1, torchrun[1]):
        raise LcpcError(f"--procs {execution.procs}: torchrun started {torchrun[1]} processes; drop --procs or "
                        f"pass --procs {torchrun[1]}")
    kind = device.split(":")[0] if device else execution.device_kind()
    world = torchrun[1] if torchrun else execution.procs
    dev = torch.device(device) if device else launch.device_of(kind, torchrun[2] if torchrun else 0,
                                                               1 if torchrun else world)
    workers = execution.workers_for(samples)
    rng = np.random.default_rng(seed + 1)
    train_eval = np.sort(rng.permutation(train_idx)[:MAX_TRAIN_EVAL])
    calib = Batches(samples, rng.permutation(train_idx)[:recipe.calib_samples], 256, workers, execution.timeout)
    name = logits_tensor(g)
    masks = weight_masks(plan)
    warnings = data_warnings(len(samples), len(hold_idx), masks)
    meets = plan.nodes_with(Action.EXCHANGE) + plan.nodes_with(Action.FORCED_SYNC)
    if recipe.branch_dropout and meets:
        warnings.append(f"branch dropout trains the model to answer with a device missing, but this plan's branches "
                        f"also meet at {len(meets)} layer(s) before the classifier ({meets[0]}, ...), so it cannot "
                        f"answer without one; convert with --sync none for a plan that can")

    if original is None and masks and already_cut(g, masks):
        raise LcpcError("recovery: the plan's weights are already cut (an earlier pass zeroed the cross-branch "
                        "weights), so they cannot teach; pass original=<the graph with the original weights>")
    original = same_structure(original, g) if original is not None else g
    teacher = GraphModule(original).to(dev).eval()
    teacher.requires_grad_(False)
    norms = [n for n in normable(g) if n not in plan.analysis.terminal]
    views = {n.name: v.out_axis for n, v in dense_nodes(g, plan.analysis.behaviours)}
    out_axes = {n: views.get(n, 0) for n in norms}
    merged = merged_branches(plan, recipe.branch_dropout)
    student = Student(g, masks, norms, out_axes, merged).to(dev)
    judge = Judge(teacher, name, samples, y_all, train_eval, hold_idx, dev, workers, execution.timeout)
    stages: dict[str, dict] = {}

    with student.norms_off():
        stages["start"] = judge.figures(student)
    outcome: dict[str, Any] = {"history": [], "steps": 0, "best_epoch": 0, "stopped": False, "throughput": None}
    resumed = None
    if masks:
        initialise(student, teacher, original, calib, dev)
        if norms:
            stages["bn_reestimated"] = judge.figures(student)
        if recipe.epochs:
            ckpt, state = None, None
            if execution.checkpoint:
                ckpt = Checkpoint(execution.checkpoint, fingerprint(plan, samples.describe(), y_all is not None,
                                                                     asdict(recipe), seed, holdout))
                state = ckpt.open(execution.resume)
            job = _Job(g, masks, norms, out_axes, merged, original, name, recipe, samples, y_all, train_idx,
                       calib.indices, judge, seed, workers, execution.timeout, kind, ckpt, state)
            if world == 1 or torchrun is not None:
                outcome, resumed = _train_here(job, student, teacher, torchrun, dev, progress)
            else:
                threads = max(1, torch.get_num_threads() // world)
                job = replace(job, student_state={k: v.cpu() for k, v in student.state_dict().items()})
                result = launch.spawn(_worker, job, world, kind, timeout=execution.timeout, threads=threads,
                                      on_message=_relay(progress))
                student.load_state_dict(result["student"])
                outcome, resumed = result["outcome"], result["resumed"]
        student.eval()
        stages["recovered"] = judge.figures(student)
        g = g.copy(constants=student.export_constants())
    else:
        stages["recovered"] = stages["start"]
    warnings += result_warnings(stages["recovered"])
    report = {
        "before": headline(stages["start"]), "after": headline(stages["recovered"]),
        "recipe": asdict(recipe), "holdout": holdout, "seed": seed, "device": str(dev),
        "precision": _precision_name(recipe.precision, dev), "processes": world, "workers": workers,
        "samples": {"train": len(train_idx), "heldout": len(hold_idx)},
        "teacher": judge.teacher_figures(),
        "stages": stages, "history": outcome["history"],
        "epochs_run": len(outcome["history"]), "steps": outcome["steps"], "best_epoch": outcome["best_epoch"],
        "stopped_early": outcome["stopped"], "throughput": outcome["throughput"],
        "seconds": round(time.perf_counter() - start, 2), "warnings": warnings,
    }
    if execution.checkpoint and recipe.epochs and masks:
        report["checkpoint"] = {"folder": str(execution.checkpoint), "resumed_from": resumed}
    return replace(plan, graph=g), report


def merged_branches(plan: Plan, dropout: float) -> dict[str, tuple[np.ndarray, int]]:
    """For branch dropout: each layer merged at the head with the branch of each channel of its input
    and that input's channel axis (``Student``'s ``merged``); empty without dropout."""
    if not dropout:
        return {}
    if not plan.merges:
        raise LcpcError(f"--branch-dropout {dropout:g}: this plan merges no layer at the head (K={plan.k}, no "
                        f"classifier on split channels), so there is no branch to drop; leave it out")
    out = {}
    for name in plan.merges:
        x = plan.graph.node(name).inputs[0]
        out[name] = (plan.branches(x), plan.analysis.axis(x))
    return out


# --------------------------------------------------------------------------- the epochs
@dataclass(frozen=True)
class _Job:
    """What a training process needs to rebuild the teacher, the student and the judge."""

    graph: Graph
    masks: dict
    norms: list
    out_axes: dict
    merged: dict
    original: Graph
    name: str
    recipe: Recipe
    samples: Samples
    labels: np.ndarray | None
    train_idx: np.ndarray
    calib_idx: np.ndarray
    judge: Judge
    seed: int
    workers: int
    timeout: float
    kind: str
    checkpoint: Checkpoint | None
    resume_state: dict | None
    student_state: dict | None = None


def _trainer(job: _Job, student, teacher, dev, rank: int, world: int, progress):
    from lcpc.passes.recover.epochs import Trainer
    from lcpc.passes.recover.loader import Batches

    calib = Batches(job.samples, job.calib_idx, 256, job.workers, job.timeout)
    trainer = Trainer(student, teacher, job.judge, job.recipe, job.samples, job.labels, job.train_idx, calib,
                      job.name, dev, seed=job.seed, rank=rank, world=world, workers=job.workers,
                      timeout=job.timeout, progress=progress if rank == 0 else None, checkpoint=job.checkpoint)
    if job.resume_state is not None:
        trainer.load_state_dict(job.resume_state)
    return trainer


def _train_here(job: _Job, student, teacher, torchrun, dev, progress) -> tuple[dict, dict | None]:
    """The epochs in this process (alone, or as one of torchrun's processes)."""
    from lcpc.passes.recover import launch
    from lcpc.passes.recover.epochs import stop_on_signals

    rank, world = (torchrun[0], torchrun[1]) if torchrun else (0, 1)
    joined = False
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            launch.join_group(job.kind, rank, world, job.timeout)
            joined = True
    try:
        trainer = _trainer(job, student, teacher, dev, rank, world, progress)
        with stop_on_signals() as stop:
            trainer.run(stop)
        return trainer.finish(), trainer.resumed
    finally:
        if joined:
            launch.leave_group()


def _worker(rank: int, world: int, job: _Job, channel) -> dict:
    """One of the processes ``launch.spawn`` started: rebuild, train, and (process 0) return the weights."""
    from lcpc.passes.recover import launch
    from lcpc.passes.recover.epochs import stop_on_signals
    from lcpc.passes.recover.student import Student
    from lcpc.passes.recover.torch_graph import GraphModule

    dev = launch.device_of(job.kind, rank)
    teacher = GraphModule(job.original).to(dev).eval()
    teacher.requires_grad_(False)
    student = Student(job.graph, job.masks, job.norms, job.out_axes, job.merged).to(dev)
    assert job.student_state is not None
    student.load_state_dict(job.student_state)
    job.judge.dev = dev
    trainer = _trainer(job, student, teacher, dev, rank, world, lambda *a: channel.send("distil", *a))
    with stop_on_signals(second_forces=False) as stop:
        trainer.run(stop)
    outcome = trainer.finish()
    return {"student": {k: v.cpu() for k, v in student.state_dict().items()}, "outcome": outcome,
            "resumed": trainer.resumed} if rank == 0 else {}


def _precision_name(precision: str, dev) -> str:
    """What ``precision`` means on ``dev``: fp32, bf16 or fp16 (the autocast dtype)."""
    import torch

    from lcpc.passes.recover.epochs import autocast_dtype
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype(precision, dev)]


def _relay(progress: Progress | None) -> Callable[[str, tuple], None]:
    def on_message(kind: str, payload: tuple) -> None:
        if kind == "distil" and progress is not None:
            progress(*payload)
    return on_message
