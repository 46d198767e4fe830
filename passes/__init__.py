"""Passes on the plan (installed as ``lcpc.passes``), one per module.

Planning passes (``layouts``, ``balance``, ``partition``, ``cut``) have one signature,
``run(plan, options) -> plan``, and ``lcpc.planner`` runs them in order, checking the
plan's invariants after each. Passes that measure on data (``refit``, ``recover``)
return ``(plan, report)``: the new plan and the figures the manifest records. No pass
changes the plan it is given.
"""
