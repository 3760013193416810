"""The attention registry: one name -> one implementation, one call signature for all.

Every implementation is an ``nn.Module`` called as ``impl(q, k, v, *, ctx) -> out`` with
q [B, S, Hq, D], k/v [B, S, Hkv, D] (GQA: Hq a multiple of Hkv) and out [B, S, Hq, D].
Stateless implementations register a plain function, which is wrapped in a parameter-free module;
stateful ones (learned feature maps) register an ``nn.Module`` subclass built from an ``AttnSpec``.
The registry holds code only: no tensors, groups or per-batch state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Union

import torch
from torch import nn

from .context import AttnContext


@dataclass(frozen=True)
class AttnSpec:
    """What a layer's attention implementation is built from."""

    name: str
    """Registry name."""
    layer_idx: int
    """Index of the decoder layer (0-based)."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA when smaller than num_heads)."""
    head_dim: int
    """Per-head dimension."""
    options: dict = field(default_factory=dict)
    """Implementation options from the config (window, feature map, sparse pattern, ...)."""


class FunctionAttention(nn.Module):
    """Parameter-free module wrapping a registered attention function."""

    def __init__(self, fn: Callable, spec: AttnSpec):
        super().__init__()
        self.fn = fn
        self.spec = spec

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: AttnContext) -> torch.Tensor:
        return self.fn(q, k, v, ctx=ctx, **self.spec.options)

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}"


_REGISTRY: Dict[str, Union[Callable, type]] = {}


def register(name: str):
    """Decorator: register an attention function ``fn(q, k, v, *, ctx, **options)`` or an nn.Module class
    ``cls(spec: AttnSpec)`` under ``name``. A duplicate name raises."""

    def deco(obj):
        if name in _REGISTRY:
            raise ValueError(f"attention implementation {name!r} is already registered ({_REGISTRY[name]!r})")
        _REGISTRY[name] = obj
        return obj

    return deco


def names() -> list[str]:
    """Registered names (after importing the built-in implementations)."""
    _import_builtins()
    return sorted(_REGISTRY)


def get(name: str):
    """The registered function or class for ``name``; an unknown name lists the valid ones."""
    _import_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown attention implementation {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build(spec: AttnSpec) -> nn.Module:
    """Instantiate the implementation for one layer."""
    obj = get(spec.name)
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return obj(spec)
    return FunctionAttention(obj, spec)


_BUILTINS = (
    "longreach.attention.dense",
    "longreach.attention.flash",
    "longreach.attention.s2",
    "longreach.attention.linear",
    "longreach.parallel.attention",
)


def _import_builtins() -> None:
    # builtins register on import; missing optional modules (not built yet, or GPU-only deps) are skipped
    import importlib

    for mod in _BUILTINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
