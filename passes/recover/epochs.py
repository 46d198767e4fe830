"""The distillation epochs, on one process or as one of several data-parallel processes.

Guarantees:
- ``Trainer.run`` trains the student for the recipe's epochs: each step takes a global batch of
  ``batch_size`` training samples in an order drawn from one seeded generator, and draws the
  batch's augmentation from the same generator; with ``world`` processes each process reads and
  trains on its own ``batch_size / world`` of the batch and applies its part of the same
  augmentation; the inserted BatchNorms normalise with the statistics of the whole batch
  (``Student.synced_norms``) and ``DistributedDataParallel`` averages the gradients, so the
  processes together see exactly the samples one process sees and make the update it makes
  (up to the order of floating-point sums);
- after each epoch process 0 alone re-measures the inserted BatchNorms' running statistics,
  judges the student and selects (the latest epoch unless worse than the best by two standard
  errors; two such epochs in a row stop early); its decision is broadcast to the others;
- ``state_dict`` is the whole state: weights, optimiser, schedule, loss scaler, the generator,
  the epoch's order and the steps done, the history and the selection; a trainer that loads it
  continues as the uninterrupted one would (bit for bit on the CPU);
- ``run(stop)``: when ``stop()`` turns true (``stop_on_signals``: Ctrl-C or SIGTERM) every
  process stops at the same step boundary (they agree by an all-reduce each step), process 0
  saves a checkpoint (with a ``checkpoint.Checkpoint``) and ``Interrupted`` is raised; process 0
  also saves one after every epoch, so a killed run loses at most one epoch;
- mixed precision (``precision``): on CUDA, autocast to bfloat16 (or float16 with a gradient
  scaler) for the teacher and student forward passes and the loss; ``fp32`` and the CPU's
  ``auto`` train in float32; evaluation is always float32;
- throughput: the samples (times views) trained on and the seconds the training steps took,
  evaluation excluded.
"""

from __future__ import annotations

import inspect
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lcpc.errors import Interrupted, LcpcError
from lcpc.fidelity import lower_by_two_se
from lcpc.passes.recover.judge import headline
from lcpc.passes.recover.loader import DEFAULT_TIMEOUT, batches_of
from lcpc.passes.recover.norms import recalibrate

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@contextmanager
def stop_on_signals(second_forces: bool = True) -> Iterator[Callable[[], bool]]:
    """A ``stop()`` that turns true on SIGINT (Ctrl-C) or SIGTERM while the block runs; with
    ``second_forces`` a second SIGINT raises ``KeyboardInterrupt`` at once (a process that is
    stuck can still be stopped). Outside the main thread signals cannot be caught: ``stop()`` stays false."""
    state = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame) -> None:
        if state["stop"] and second_forces and signum == signal.SIGINT:
            raise KeyboardInterrupt
        state["stop"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: state["stop"]
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def autocast_dtype(precision: str, dev: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``dev`` (None: float32)."""
    if precision not in PRECISIONS:
        raise LcpcError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if dev.type != "cuda":
        if precision == "fp16":
            raise LcpcError("--precision fp16 needs a CUDA GPU; on the CPU use fp32 (or bf16)")
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


class _Logits(nn.Module):
    """The student's logits as a module's forward (what DistributedDataParallel wraps)."""

    def __init__(self, student, name: str) -> None:
        super().__init__()
        self.student, self.name = student, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student.run({self.student.graph.inputs[0]: x}, [self.name])[self.name].flatten(1)


class Trainer:
    """The distillation epochs of one process; see the module docstring."""

    def __init__(self, student, teacher, judge, recipe, samples, labels, train_idx, calib, name: str, dev, *,
                 seed: int, rank: int = 0, world: int = 1, workers: int = 0, timeout: float = DEFAULT_TIMEOUT,
                 progress: Callable | None = None, checkpoint=None) -> None:
        self.student, self.teacher, self.judge, self.recipe = student, teacher, judge, recipe
        self.samples, self.labels, self.train_idx, self.calib = samples, labels, np.asarray(train_idx), calib
        self.name, self.dev, self.rank, self.world = name, dev, rank, world
        self.workers, self.timeout, self.progress, self.checkpoint = workers, timeout, progress, checkpoint
        for node in student.normed():
            student.norm(node).momentum = recipe.bn_momentum
        self.batch = min(recipe.batch_size, len(self.train_idx))
        if self.batch % world:
            raise LcpcError(f"--batch-size {self.batch} does not split evenly over {world} processes; pass a "
                            f"multiple of {world}")
        self.local = self.batch // world
        self.branches = student.branch_count()
        self.steps = len(self.train_idx) // self.batch      # the last partial batch is dropped
        total = self.steps * recipe.epochs
        self.opt = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        warm = max(1, int(recipe.warmup * total))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: (s + 1) / warm if s < warm else
            0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
        self.amp = autocast_dtype(recipe.precision, dev)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.shift = recipe.max_shift if recipe.max_shift is not None else samples.sample_shape[-1] // 16
        self.gen = torch.Generator().manual_seed(seed)
        self.model: nn.Module = _Logits(student, name)
        if world > 1:  # BatchNorm buffers: synced in training (synced_norms); process 0 measures the kept ones
            ddp = nn.parallel.DistributedDataParallel
            newer = "forward_sync_buffers" in inspect.signature(ddp).parameters
            local: dict[str, Any] = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
            self.model = ddp(self.model, device_ids=[dev.index] if dev.type == "cuda" else None, **local)
        self.epoch_done, self.step_done = 0, 0
        self.order: torch.Tensor | None = None
        self.losses: list[float] = []
        self.history: list[dict] = []
        self.worse, self.stopped = 0, False
        self.best = _Snapshot(student, judge.heldout_kl, 0) if rank == 0 else None
        self.seconds, self.images = 0.0, 0
        self.resumed: dict | None = None

    # ------------------------------------------------------------------ the loop
    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        while self.epoch_done < self.recipe.epochs and not self.stopped:
            epoch = self.epoch_done + 1
            if self.order is None:
                self.order = torch.randperm(len(self.train_idx), generator=self.gen)
                self.step_done, self.losses = 0, []
            self.model.train()
            first = self.step_done + 1
            mine = [self._global(step)[self.rank * self.local:(self.rank + 1) * self.local]
                    for step in range(first, self.steps + 1)]
            reader = batches_of(self.samples, [self.train_idx[m] for m in mine], self.workers, timeout=self.timeout,
                                pin=self.dev.type == "cuda")
            start = time.perf_counter()
            try:
                for step, xb in zip(range(first, self.steps + 1), reader):
                    if self._agree(stop()):
                        self.seconds += time.perf_counter() - start
                        self._interrupt(epoch, step - 1)
                    self.losses.append(self._step(step, xb))
                    self.step_done = step
                    self.images += self.batch * self.recipe.views
                    if self.progress is not None:
                        self.progress(epoch, step, self.steps, self.losses[-1], None)
            finally:
                reader.close()
            self.seconds += time.perf_counter() - start
            self._end_epoch(epoch)
            self.epoch_done, self.order = epoch, None
            self._save(interrupted=False)

    def _global(self, step: int) -> torch.Tensor:
        """Positions (in the training indices) of the global batch of ``step`` (1-based)."""
        assert self.order is not None
        return self.order[(step - 1) * self.batch:step * self.batch]

    def _step(self, step: int, xb: torch.Tensor) -> float:
        recipe, mine = self.recipe, slice(self.rank * self.local, (self.rank + 1) * self.local)
        views = [_apply(xb, _draw(self.batch, xb.dim(), recipe.augment, self.shift, self.gen), mine)
                 for _ in range(recipe.views)]
        x = torch.cat(views).to(self.dev, non_blocking=True)
        inp, temp = self.student.graph.inputs[0], recipe.temperature
        keep = self._kept_branches(mine)
        with torch.autocast(self.dev.type, dtype=self.amp) if self.amp is not None else nullcontext():
            with torch.no_grad():
                t = self.teacher.run({inp: x}, [self.name])[self.name].flatten(1).float()
            with self.student.synced_norms() if self.world > 1 else nullcontext(), \
                    self.student.dropping(keep) if keep is not None else nullcontext():
                s = self.model(x).float()
            loss = F.kl_div(F.log_softmax(s / temp, 1), F.log_softmax(t / temp, 1), reduction="batchmean",
                            log_target=True) * temp * temp
            if self.labels is not None and recipe.label_weight:
                positions = self._global(step)[mine].numpy()
                y = torch.from_numpy(self.labels[self.train_idx[positions]]).repeat(recipe.views).to(self.dev)
                loss = loss + recipe.label_weight * F.cross_entropy(s, y)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.sched.step()
        return float(loss.detach())

    def _kept_branches(self, mine: slice) -> torch.Tensor | None:
        """Branch dropout: per sample of every view, which branches the merge keeps (the head always;
        each other branch with probability 1 - p), drawn for the global batch from the generator;
        None without dropout (the generator then draws nothing)."""
        p, k = self.recipe.branch_dropout, self.branches
        if not p or k < 2:
            return None
        keeps = []
        for _ in range(self.recipe.views):
            keep = torch.rand(self.batch, k, generator=self.gen) >= p
            keep[:, 0] = True
            keeps.append(keep[mine])
        return torch.cat(keeps).to(self.dev)

    def _agree(self, stop: bool) -> bool:
        """Whether any process was asked to stop (an all-reduce, so all stop at the same step)."""
        if self.world == 1:
            return stop
        flag = torch.tensor([int(stop)], device=self.dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _end_epoch(self, epoch: int) -> None:
        if self.rank == 0:
            recalibrate(self.student, self.calib, self.dev)
            fig = self.judge.figures(self.student)
            self.history.append({"epoch": epoch, "loss": float(np.mean(self.losses)) if self.losses else 0.0, **fig})
            if self.progress is not None:
                self.progress(epoch, self.steps, self.steps, self.history[-1]["loss"],
                              headline(fig).get("top1_agreement"))
            assert self.best is not None
            worse = self.best.significantly_better_than(self.judge.heldout_kl)
            if not worse and self.best.mean_kl() >= _mean(self.judge.heldout_kl):
                self.best = _Snapshot(self.student, self.judge.heldout_kl, epoch)
            self.worse = self.worse + 1 if worse else 0
            self.stopped = self.worse >= self.recipe.patience
        if self.world > 1:
            flag = torch.tensor([int(self.stopped), self.worse], device=self.dev)
            dist.broadcast(flag, 0)
            self.stopped, self.worse = bool(flag[0].item()), int(flag[1].item())

    def _interrupt(self, epoch: int, step: int) -> None:
        self._save(interrupted=True)
        where = f"at epoch {epoch}, step {step} of {self.steps}"
        if self.checkpoint is not None:
            raise Interrupted(f"recovery interrupted {where}; the checkpoint in {self.checkpoint.folder} holds it: "
                              f"rerun the same command with --resume to continue")
        raise Interrupted(f"recovery interrupted {where}; nothing was kept (pass --checkpoint DIR to keep progress "
                          f"across interruptions)")

    def _save(self, interrupted: bool) -> None:
        if self.checkpoint is None or self.rank != 0:
            return
        self.checkpoint.save(self.state_dict(), {"epochs_done": self.epoch_done, "steps_done": self.step_done,
                                                 "steps_per_epoch": self.steps, "epochs": self.recipe.epochs,
                                                 "interrupted": interrupted, "stopped_early": self.stopped})

    # ------------------------------------------------------------------ results
    def finish(self) -> dict:
        """Restore the best epoch if the last ones were worse; the figures the report records."""
        chosen = len(self.history)
        if self.worse and self.best is not None:
            chosen = self.best.epoch
            self.best.restore(self.student)
        return {"history": self.history, "steps": self.steps * len(self.history), "best_epoch": chosen,
                "stopped": self.stopped,
                "throughput": {"samples": self.images, "seconds": round(self.seconds, 3),
                               "samples_per_second": round(self.images / self.seconds, 2) if self.seconds else None}}

    def state_dict(self) -> dict:
        best = self.best
        return {"student": self.student.state_dict(), "optimizer": self.opt.state_dict(),
                "schedule": self.sched.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {},
                "generator": self.gen.get_state(),
                "order": self.order if self.order is not None else torch.zeros(0, dtype=torch.int64),
                "has_order": self.order is not None, "epoch_done": self.epoch_done, "step_done": self.step_done,
                "losses": list(self.losses), "history": json.dumps(self.history),
                "worse": self.worse, "stopped": self.stopped, "seconds": self.seconds, "images": self.images,
                "best_state": best.state if best else {}, "best_epoch": best.epoch if best else 0,
                "best_kl": torch.from_numpy(best.kl) if best and best.kl is not None else torch.zeros(0),
                "best_has_kl": bool(best and best.kl is not None)}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["schedule"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["generator"])
        self.order = state["order"] if state["has_order"] else None
        self.epoch_done, self.step_done = int(state["epoch_done"]), int(state["step_done"])
        self.losses = [float(v) for v in state["losses"]]
        self.history = json.loads(state["history"])
        self.worse, self.stopped = int(state["worse"]), bool(state["stopped"])
        self.seconds, self.images = float(state["seconds"]), int(state["images"])
        if self.rank == 0:
            kl = state["best_kl"].numpy() if state["best_has_kl"] else None
            self.best = _Snapshot.of(state["best_state"], kl, int(state["best_epoch"]))
        self.resumed = {"epoch": self.epoch_done + 1, "steps_done": self.step_done if self.order is not None else 0}


def _mean(kl) -> float:
    return float(kl.mean()) if kl is not None and len(kl) else 0.0


class _Snapshot:
    """A copy of the student's state with its per-sample held-out KL."""

    def __init__(self, student, kl, epoch: int) -> None:
        self.state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        self.kl, self.epoch = (None if kl is None else np.array(kl, copy=True)), epoch

    @classmethod
    def of(cls, state: dict, kl, epoch: int) -> _Snapshot:
        snap = cls.__new__(cls)
        snap.state, snap.kl, snap.epoch = state, kl, epoch
        return snap

    def mean_kl(self) -> float:
        return _mean(self.kl)

    def significantly_better_than(self, kl) -> bool:
        """Paired test: is ``kl`` worse than this snapshot's by more than two standard errors?"""
        if self.kl is None or kl is None or len(kl) < 2:
            return False
        return lower_by_two_se(self.kl, kl)

    def restore(self, student) -> None:
        student.load_state_dict(self.state)


# --------------------------------------------------------------------------- augmentation
def _draw(n: int, dim: int, mode: str, shift: int, gen: torch.Generator) -> dict:
    """The random choices of one augmented view of a global batch of ``n`` images: per image, a
    shift of up to ``shift`` pixels per axis and/or a mirror (drawn in that order)."""
    params: dict = {}
    if mode == "none" or dim != 4:
        return params
    if "shift" in mode and shift > 0:
        params["offsets"] = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen).tolist()
        params["shift"] = shift
    if "flip" in mode:
        params["flip"] = torch.rand(n, generator=gen) < 0.5
    return params


def _apply(x: torch.Tensor, params: dict, mine: slice) -> torch.Tensor:
    """The view ``params`` describes, of this process's images ``x`` (rows ``mine`` of the global batch)."""
    if "offsets" in params:
        shift, (h, w) = params["shift"], x.shape[2:]
        padded = F.pad(x, (shift,) * 4)
        x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(params["offsets"][mine])])
    if "flip" in params:
        x = torch.where(params["flip"][mine][:, None, None, None], x.flip(3), x)
    return x
