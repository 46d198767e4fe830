"""Graph-to-plan passes: each module exposes ``run(plan, ...) -> plan``."""
