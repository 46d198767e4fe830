"""Recovery: the accuracy the cut costs, won back on data (``lcpc recover``), all in one place.

    refit        the least-squares refit of the cut layers, or their BN statistics (numpy, no PyTorch)
    distil       distillation from the original model (PyTorch): ``run`` and its ``Recipe``
    student      the cut plan as a trainable PyTorch module whose dropped weights stay zero
    torch_graph  the differentiable executor of a plan's graph the student is built on
    judge        held-out figures (agreement, KL, accuracy) and the warnings about the data
    norms        per-channel statistics and row norms the student starts from

Both passes (``refit.run``, ``distil.run``) take a plan and data and return ``(plan, report)``:
the plan with new weights (never new decisions) and the figures the manifest records. Only
``distil``'s helpers import PyTorch, and only when it runs.
"""
