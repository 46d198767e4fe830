"""Fixtures of the recovery tests (import them into a module that has already skipped without torch):
one torch thread for the module, and the digits example's train/test split."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster and makes the runs bit-reproducible."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def split():
    from examples.digits import data

    return data.load_split()
