"""The energy partition keeps at least as much weight energy as the reference implementation.

The reference numbers (``partition_energy_reference.json``) were computed with the
partition refinement as it was before it was made incremental (commit 833a72d); a faster
refinement must not lose partition quality on any zoo model or K.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples.zoo import ZOO
from lcpc import frontend, planner

REFERENCE = json.loads((Path(__file__).parent / "partition_energy_reference.json").read_text())["kept"]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits" / "digits_cnn.onnx"


def _model(name: str) -> bytes:
    return EXAMPLE.read_bytes() if name == "digits_cnn" else ZOO[name]().SerializeToString()


@pytest.mark.parametrize("name", sorted({key.split("/")[0] for key in REFERENCE}))
def test_energy_kept_not_below_reference(name):
    graph, source = frontend.load(_model(name))
    for key, ref in REFERENCE.items():
        model, k = key.split("/")
        if model != name:
            continue
        p = planner.plan(graph, source, int(k), "none")
        assert p.partition_energy["kept"] >= ref - 1e-9, (key, p.partition_energy["kept"], ref)
        assert p.partition_energy["kept"] > p.partition_energy["kept_contiguous"]
