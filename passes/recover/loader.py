"""Batches of recovery samples as torch tensors, read by data-loader worker processes.

Guarantees:
- ``Batches(samples, indices, size)`` is re-iterable: each pass yields the samples at
  ``indices``, in that order, in batches of ``size`` (the last may be smaller), as float32
  tensors; ``batches_of(samples, chunks)`` does the same for given index chunks (a training
  epoch's batches);
- with ``workers > 0`` a ``torch.utils.data.DataLoader`` reads them in that many processes
  (``Samples.take`` in each), at most two batches ahead per worker, so memory holds a few
  batches whatever the number of samples; with 0, the calling process reads them;
- every wait for a worker's batch is bounded (``timeout`` seconds); a worker that fails, dies
  or times out ends the iteration in one ``LcpcError`` line naming what happened.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lcpc.errors import LcpcError
from lcpc.passes.recover.samples import Samples

DEFAULT_TIMEOUT = 600.0


class _Taken(torch.utils.data.Dataset):
    """A dataset whose items are whole batches: ``__getitems__`` takes the batch's indices."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, indices: list[int]) -> np.ndarray:
        return self.samples.take(np.asarray(indices, dtype=np.int64))

    def __getitem__(self, index: int) -> np.ndarray:
        return self.samples.take(np.array([index]))[0]


def _as_tensor(batch: Any) -> torch.Tensor:
    """The collate function: a batch ``_Taken.__getitems__`` read is one array already."""
    return torch.from_numpy(batch)


def batches_of(samples: Samples, chunks: Sequence[np.ndarray], workers: int = 0, *,
               timeout: float = DEFAULT_TIMEOUT, pin: bool = False) -> Iterator[torch.Tensor]:
    """The samples of each index chunk, in order, as one tensor per chunk."""
    chunks = [np.asarray(c, dtype=np.int64) for c in chunks if len(c)]
    if workers <= 0 or len(chunks) <= 1:
        for c in chunks:
            yield torch.from_numpy(samples.take(c))
        return
    loader = torch.utils.data.DataLoader(_Taken(samples), batch_sampler=[c.tolist() for c in chunks],
                                         num_workers=workers, collate_fn=_as_tensor, pin_memory=pin,
                                         timeout=timeout, prefetch_factor=2)
    try:
        yield from loader
    except LcpcError as exc:  # re-raised from a worker, with its traceback in the message
        raise LcpcError(_last_line(str(exc))) from None
    except RuntimeError as exc:
        text = str(exc)
        if "DataLoader" not in text:
            raise
        raise LcpcError(f"recovery data: a data-loader process failed ({_last_line(text)}); rerun with "
                        f"--workers 0 to read the data in the main process") from None


def _last_line(text: str) -> str:
    """The message of an exception re-raised from a worker: its last non-empty line, the type
    prefix dropped."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else text
    for prefix in ("lcpc.errors.LcpcError: ", "LcpcError: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


class Batches:
    """The samples at ``indices`` in batches of ``size``; re-iterable (see the module docstring)."""

    def __init__(self, samples: Samples, indices, size: int = 256, workers: int = 0,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.samples, self.size, self.workers, self.timeout = samples, max(1, size), workers, timeout
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[torch.Tensor]:
        chunks = [self.indices[i:i + self.size] for i in range(0, len(self.indices), self.size)]
        return batches_of(self.samples, chunks, self.workers, timeout=self.timeout)
