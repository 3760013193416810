"""The per-layer attention plan: which registry implementation (and options) each decoder layer uses."""

from __future__ import annotations

from ..errors import ConfigError
import logging

from ..attention import registry

log = logging.getLogger(__name__)


def _check_name(name: str, field: str) -> None:
    valid = registry.names()
    if name not in valid:
        raise ConfigError(f"{field}={name!r} is not a registered attention implementation; "
                         f"valid names: {', '.join(valid)}")


def attention_plan(model_cfg, num_layers: int) -> list[str]:
    """Registry name per layer [num_layers]: ``model.attention`` everywhere, then ``model.attention_layers``
    overrides ({'3': 's2'}; negative indices count from the end). Names are checked against the registry."""
    _check_name(model_cfg.attention, "model.attention")
    plan = [model_cfg.attention] * num_layers
    for key, name in (model_cfg.attention_layers or {}).items():
        try:
            idx = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"model.attention_layers key {key!r} must be a layer index, e.g. {{'3': 's2'}}") from None
        if not -num_layers <= idx < num_layers:
            raise ConfigError(f"model.attention_layers index {idx} is out of range for a model with {num_layers} "
                             f"layers (after model.num_layers truncation); use 0..{num_layers - 1}")
        _check_name(name, f"model.attention_layers[{key}]")
        plan[idx] = name
    if len(set(plan)) > 1:
        log.info("attention plan: %s", ", ".join(f"{i}:{n}" for i, n in enumerate(plan)))
    return plan


def attention_options_plan(model_cfg, plan: list[str]) -> list[dict]:
    """Options per layer [len(plan)] from ``model.attention_options``.

    Two forms: keyed by registry name ({'s2': {'window': 256}, 'linear': {...}}), each entry going to the
    layers that use that name; or one flat dict ({'window': 256}) going to every non-'dense' layer ('dense'
    takes no options).
    """
    opts = dict(model_cfg.attention_options or {})
    if opts and all(isinstance(v, dict) for v in opts.values()):
        valid = registry.names()
        for name in opts:
            if name not in valid:
                raise ConfigError(f"model.attention_options key {name!r} is not a registered attention "
                                 f"implementation; valid names: {', '.join(valid)}")
        return [dict(opts.get(name, {})) for name in plan]
    if opts and all(name == "dense" for name in plan):
        raise ConfigError(f"model.attention_options={opts} is set but every layer uses 'dense', which takes no "
                         "options; remove them or choose another model.attention")
    per_layer = [dict(opts) if name != "dense" else {} for name in plan]
    if opts:
        log.info("attention options %s go to the non-dense layers %s", opts,
                 [i for i, n in enumerate(plan) if n != "dense"])
    return per_layer
