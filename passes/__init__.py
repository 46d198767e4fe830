"""Passes on the plan (installed as ``lcpc.passes``), one per module.

Planning passes, run in this order by ``lcpc.planner`` (the plan's invariants checked
after each): ``layouts`` (R/S/H per tensor), ``balance`` (channel shares by device
speed), ``partition`` (a branch for every channel class), ``merge`` (how each
classifier is merged at the head), ``cut`` (cut or exchange every layer between split
tensors, by the sync policy). They share one signature, ``run(plan, options) ->
PassResult``: the new plan and what it changed.

Passes that measure on data return ``(plan, report)``: the new plan and the figures
the manifest records: ``prune`` (whole channel classes, with the pruning record) and
the two recovery passes in ``recover`` (``refit``, ``distil``). No pass changes the
plan it is given. Program-level transforms (int8 stages and wire, after lowering) are
not passes on the plan: they live in ``lcpc.compress``.
"""
