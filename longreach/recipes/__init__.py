"""Recipes: sequences of stages (config + trainer calls + evals)."""

from __future__ import annotations


def run_recipe(cfg, mode: str = "train"):
    """Dispatch ``longreach train|eval|demo`` to the recipe the config names."""
    from . import extend_context

    if mode == "eval":
        return extend_context.evaluate_only(cfg)
    return extend_context.run(cfg, demo=(mode == "demo"))
