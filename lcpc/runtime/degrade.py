"""Degraded answers: the head merges the branches it has when a device is missing.

In a plan whose branches are independent until the classifier (pure LCP), every non-head
device receives only the model input and sends only its contribution to the head's merge
stage: its partial logits, or its slice of the pooled features. The merge is linear in
those contributions (the bias is added once, at the head), so with the devices M missing
the head still answers

    merge( sum over present b of  c_b / s )      s = sum over present b of share_b

where ``share_b`` is branch b's fraction of the merged layer's input channels: zeros stand
in for the missing contributions and the present ones are scaled by 1/s, the rescale of
dropout (``lcpc recover --branch-dropout`` trains the model for it). With nothing missing
the inputs are used exactly as they are.

Guarantees:
- ``Merge.parse`` reads the manifest's ``degrade`` section, which the compiler writes for
  every plan: the merge stage and its contributions when the plan can degrade, else the
  reason it cannot (``why``);
- ``check(merge, why, missing, names)`` raises an ``LcpcError`` naming the device and the
  reason when those devices cannot be left out (the head, an unknown device, a plan that
  cannot degrade, every contribution at once);
- ``Merge.fill(values, missing)`` returns the merge stage's contributions with the missing
  ones zero and the present ones scaled, per merged layer, and leaves ``values`` as it is.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lcpc.errors import LcpcError

HEAD = 0


@dataclass(frozen=True)
class Contribution:
    """One input of the merge stage: what ``device`` contributes to the merged layer ``layer``."""

    name: str       # the merge stage's input (a local name on the head)
    device: int
    layer: str      # the merged layer (the classifier node)
    share: float    # the device's fraction of that layer's input channels


@dataclass(frozen=True)
class Merge:
    """The merge a plan can answer from when devices are missing (see the module docstring)."""

    stage: str
    contributions: tuple[Contribution, ...]
    shapes: Mapping[str, tuple[tuple[int, ...], str]]   # contribution name -> (shape, dtype)

    @classmethod
    def parse(cls, section: Mapping[str, Any] | None, stages: Mapping[str, Any]) -> tuple[Merge | None, str]:
        """(the merge, "") when the section says the plan can degrade, else (None, why not).
        ``stages`` maps stage ids to the typed stages (for the contributions' shapes)."""
        if not section:
            return None, "the manifest records no merge to answer from (convert the model again)"
        if section.get("stage") is None:
            return None, str(section.get("why") or "the plan cannot answer with a branch missing")
        stage = stages[section["stage"]]
        specs = {i.name: (i.shape, i.dtype) for i in stage.inputs}
        inputs = tuple(Contribution(c["name"], c["device"], c["layer"], c["share"]) for c in section["inputs"])
        return cls(stage.id, inputs, {c.name: specs[c.name] for c in inputs}), ""

    @property
    def devices(self) -> set[int]:
        """The devices that may be left out: every contributing device but the head."""
        return {c.device for c in self.contributions} - {HEAD}

    def fill(self, values: Mapping[str, np.ndarray], missing: Collection[int]) -> dict[str, np.ndarray]:
        """The contributions to feed the merge stage, by name (see the module docstring)."""
        out = {}
        for layer in dict.fromkeys(c.layer for c in self.contributions):
            mine = [c for c in self.contributions if c.layer == layer]
            present = sum(c.share for c in mine if c.device not in missing)
            for c in mine:
                if c.device in missing:
                    shape, dtype = self.shapes[c.name]
                    out[c.name] = np.zeros(shape, dtype)
                elif missing:
                    out[c.name] = (values[c.name] / present).astype(values[c.name].dtype)
                else:
                    out[c.name] = values[c.name]
        return out


def check(merge: Merge | None, why: str, missing: Collection[int], names: Mapping[int, str]) -> None:
    """Refuse to leave out ``missing`` (device ids) unless the plan can answer without them."""
    for d in missing:
        if d not in names:
            raise LcpcError(f"--without: no device {d}; the plan has {', '.join(names.values())}")
        if d == HEAD:
            raise LcpcError(f"--without {names[d]}: {names[d]} is the head, which merges the branches and returns "
                            f"the outputs; it cannot be left out")
    if not missing:
        return
    if merge is None:
        raise LcpcError(f"--without {', '.join(names[d] for d in missing)}: this plan cannot answer with a device "
                        f"missing: {why}")
    if set(missing) >= merge.devices and HEAD not in {c.device for c in merge.contributions}:
        raise LcpcError("--without: every branch would be missing; nothing is left to answer from")
