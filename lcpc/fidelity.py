"""Fidelity: how closely a converted (LCP) model follows the original, on the same inputs.

``compare`` is pure numpy. For N samples with reference logits ``r`` (the original
model) and candidate logits ``c`` (the converted one), both ``(N, C)`` (trailing axes
are flattened), it reports:

- ``top1_agreement`` = mean_i [argmax r_i == argmax c_i] (ties: the lowest class index);
- ``top5_overlap`` = mean_i |top_k(r_i) ∩ top_k(c_i)| / k with k = min(5, C)
  (``top5_k`` records k; with C <= 5 it is 1 by construction);
- ``kl_divergence`` = mean_i KL(softmax(r_i) || softmax(c_i))
  = mean_i sum_j p_ij (log p_ij - log q_ij), from log-softmax in float64 (the
  max-shifted log-sum-exp, so logits of any magnitude are safe); each sample's term
  is clamped at 0 against rounding, since KL >= 0;
- ``max_rel_logit_error`` = max_i ( max_j |r_ij - c_ij| / max_j |r_ij| ): each sample's
  worst logit error relative to that sample's largest reference logit magnitude
  (denominator floored at 1e-12), then the worst sample;
- ``reference_accuracy`` / ``candidate_accuracy`` = mean_i [argmax == label_i] when
  integer labels are given, else None; ``samples`` = N and ``classes`` = C.

``reference_logits`` runs the original model (onnxruntime) on the inputs a folder
takes (``lcpc.pipeline.verify`` runs the folder beside it and calls ``compare``). It
guarantees that the original is the model the folder was converted from (the
manifest's ``source.path`` and ``source.sha256``) unless the caller passes one
explicitly, and says to pass ``--model PATH`` when the recorded file is missing or
changed; it takes models with one input and treats the first output as the logits; it
runs the original in batches when its batch dim is dynamic and sample-group by
sample-group when it is fixed; ``padded_chunks`` pads the last group by repeating the
last sample (padding is never scored).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from lcpc.errors import LcpcError
from lcpc.runtime.manifest import Manifest, Tensor, read_original
from lcpc.runtime.session import open_session

REL_FLOOR = 1e-12


def _as_logits(x: Any, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[0] == 0 or x[0].size == 0:
        raise LcpcError(f"{what}: shape {x.shape}; expected (samples, classes) with at least one of each")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise LcpcError(f"{what}: dtype {x.dtype}; expected real numbers")
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    if not np.isfinite(x).all():
        raise LcpcError(f"{what}: contains NaN or Inf")
    return x


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, stable for logits of any magnitude."""
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries per row, largest first; ties go to the lower index."""
    return np.argsort(-x, axis=1, kind="stable")[:, :k]


def kl_per_sample(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(candidate)) of every row."""
    lp, lq = log_softmax(reference_logits), log_softmax(candidate_logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=1), 0.0)


def lower_by_two_se(a: np.ndarray, b: np.ndarray) -> bool:
    """Paired test over the same samples (2 or more): is the mean of ``a`` lower than the
    mean of ``b`` by more than two standard errors of their difference?"""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    return float(d.mean()) > 2 * float(d.std(ddof=1)) / np.sqrt(d.size)


def compare(reference_logits: np.ndarray, candidate_logits: np.ndarray,
            labels: np.ndarray | None = None) -> dict[str, Any]:
    """Fidelity figures of ``candidate`` against ``reference`` (see the module docstring)."""
    ref = _as_logits(reference_logits, "reference logits")
    cand = _as_logits(candidate_logits, "candidate logits")
    if ref.shape != cand.shape:
        raise LcpcError(f"reference logits {ref.shape} and candidate logits {cand.shape} differ in shape")
    n, classes = ref.shape
    k = min(5, classes)
    top_r, top_c = top_k(ref, k), top_k(cand, k)
    overlap = np.array([len(set(a) & set(b)) for a, b in zip(top_r.tolist(), top_c.tolist())]) / k
    kl = kl_per_sample(ref, cand)
    rel = np.abs(ref - cand).max(axis=1) / np.maximum(np.abs(ref).max(axis=1), REL_FLOOR)
    result: dict[str, Any] = {
        "samples": int(n), "classes": int(classes),
        "top1_agreement": float(np.mean(top_r[:, 0] == top_c[:, 0])),
        "top5_overlap": float(overlap.mean()), "top5_k": int(k),
        "kl_divergence": float(kl.mean()),
        "max_rel_logit_error": float(rel.max()),
        "reference_accuracy": None, "candidate_accuracy": None,
    }
    if labels is not None:
        y = check_labels(labels, n, classes)
        result["reference_accuracy"] = float(np.mean(top_r[:, 0] == y))
        result["candidate_accuracy"] = float(np.mean(top_c[:, 0] == y))
    return result


MAX_HELDOUT = 5000


def holdout_split(n: int, holdout: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``n`` samples into (training, held-out) indices, both ascending.

    ``round(holdout * n)`` samples are held out (at most ``MAX_HELDOUT``, and at least 2
    stay for training); every recovery pass splits with this, so with the same seed the
    refit and the distillation never see the held-out samples they are judged on."""
    if not 0 <= holdout < 1:
        raise LcpcError(f"recovery: holdout {holdout} must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    n_hold = max(0, min(int(round(holdout * n)), MAX_HELDOUT, n - 2))
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def check_labels(labels: Any, n: int, classes: int | None, where: str = "labels") -> np.ndarray:
    """``labels`` as ``n`` int64 class indices in ``0..classes-1`` (any range when ``classes`` is None),
    or an ``LcpcError`` naming ``where`` (the labels file) and what is wrong."""
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise LcpcError(f"{where}: shape {y.shape}; expected ({n},), one class index per sample")
    if not np.issubdtype(y.dtype, np.integer):
        raise LcpcError(f"{where}: dtype {y.dtype}; expected integer class indices")
    if n and (y.min() < 0 or (classes is not None and y.max() >= classes)):
        raise LcpcError(f"{where}: values {int(y.min())}..{int(y.max())} outside the model's classes "
                        f"0..{'N' if classes is None else classes - 1}")
    return y.astype(np.int64)


def classes_of(shape: Any) -> int:
    """The number of classes of logits shaped ``shape`` (samples first), as ``compare`` counts them."""
    return int(np.prod([int(d) for d in list(shape)[1:]]))


# ----------------------------------------------------------------------------- evaluate
def padded_chunks(x: np.ndarray, step: int, multiple: int):
    """Slices of ``x`` of ``step`` samples (a multiple of ``multiple``), the last one
    padded with copies of the last sample; yields (chunk, number of real samples)."""
    for start in range(0, len(x), step):
        chunk = x[start:start + step]
        real = len(chunk)
        pad = -real % multiple
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        yield chunk, real


def _run_original(session, x: np.ndarray, output: str, batch_size: int) -> np.ndarray:
    spec = session.get_inputs()[0]
    fixed = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
    step = fixed or batch_size
    parts = [session.run([output], {spec.name: chunk})[0][:real]
             for chunk, real in padded_chunks(x, step, fixed or 1)]
    return np.concatenate(parts)


def _check_original(session, where: str, data: np.ndarray, output: str) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise LcpcError(f"{where}: the model has {len(inputs)} inputs; verify takes single-input models")
    want = inputs[0].shape
    fixed_ok = len(want) == data.ndim and all(
        not isinstance(d, int) or d <= 0 or d == s for d, s in zip(want[1:], data.shape[1:]))
    if not fixed_ok:
        raise LcpcError(f"{where}: the original model takes input shape {list(want)}, the data has "
                        f"{list(data.shape)}")
    names = [o.name for o in session.get_outputs()]
    if output not in names:
        raise LcpcError(f"{where}: the model has no output '{output}'; is it the model this folder was "
                        f"converted from?")


def as_input(data: Any, spec: Tensor) -> np.ndarray:
    x = np.asarray(data)
    want = spec.shape
    if x.ndim != len(want) or tuple(x.shape[1:]) != want[1:] or x.shape[0] == 0:
        raise LcpcError(f"data: shape {tuple(x.shape)}, the model's input '{spec.name}' takes "
                        f"(N, {', '.join(map(str, want[1:]))}) with N >= 1")
    dtype = np.dtype(spec.dtype)
    if x.dtype != dtype:
        if not (np.issubdtype(x.dtype, np.floating) and np.issubdtype(dtype, np.floating)):
            raise LcpcError(f"data: dtype {x.dtype}, the model takes {dtype} (preprocess the data first)")
        x = x.astype(dtype)
    return x


def reference_logits(manifest: Manifest, x: np.ndarray, original_model: bytes | str | Path | None,
                     batch_size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The original model's first output on ``x`` (checked against the folder's input), and
    ``{path, sha256, matches_manifest}`` of the model that produced it."""
    output = manifest.json["source"]["outputs"][0]["name"]
    model, where = read_original(manifest, original_model)
    # from the path when there is one, so external weight files next to it load too
    session = open_session(model if where == "<bytes>" else where, f"{where} (the original model)", threads=None)
    _check_original(session, where, x, output)
    sha = hashlib.sha256(model).hexdigest()
    return _run_original(session, x, output, batch_size), \
        {"path": where, "sha256": sha, "matches_manifest": sha == manifest.json["source"]["sha256"]}
