"""From ``parallel.*`` in the run config to what the trainer needs: checks, the mesh, the groups and the shard hook.

Two calls, one on each side of model loading (the attention plan is fixed when the model is built, the head counts
are known only after it is read):

    cfg = cp_model_config(cfg)                      # before load_model: the attention names CP needs
    model, tok = load_model(cfg.model, ...)
    par = setup_parallel(cfg, dist, num_heads=..., num_kv_heads=...)   # checks, then the mesh (collective)
    Trainer(cfg, model, dist=dist, dp_group=par.dp_group, sp_group=par.sp_group, shard_fn=par.shard_fn)
    batches(..., dp_rank=par.dp_rank, dp_world=par.dp)  # every CP rank of a replica reads the same global batch

How ``model.attention`` relates to ``parallel.strategy`` (the one place this is decided):

* ``parallel.cp=1``: nothing changes; the model runs the attention it names.
* ``parallel.cp>1``: every decoder layer must run either the strategy's registry entry ('ring' | 'ulysses' |
  'hybrid', all exact softmax attention, dispatching on the ``CPAttnInfo`` the shard plan puts in ``ctx.parallel``)
  or 'linear' (state passing, reading the same ``CPAttnInfo``'s ``group``/``chunk_ids``/``num_chunks``/``doc_ids``:
  linear layers pass state over the whole CP group in the plan's chunk order, whatever the strategy, so one
  ShardPlan serves a hybrid model). ``model.attention='dense'`` (the default) is read as "plain softmax
  attention" and becomes the strategy's name, logged once. ``model.attention`` equal to the strategy's name or
  'linear' is taken as is, and so are ``model.attention_layers`` entries naming the strategy or 'linear'.
  Refused before the model is built: another CP strategy's name (the plan would shard for one layout and the
  layer expect another), a single-rank implementation ('flash', 's2': they would attend within the local shard
  only), an explicit 'dense' in ``model.attention_layers`` (a per-layer override is a deliberate choice, so it is
  not silently rewritten: name the strategy instead), and ``model.attention_options`` for the softmax layers
  (the CP strategies take none). Options for 'linear' layers are fine: keyed ``{'linear': {...}}``, or flat when
  the softmax layers come from 'dense' (flat options went to the non-dense layers, i.e. the linear ones; they are
  re-keyed to 'linear' so the renamed softmax layers do not receive them).

Shard layout (``plan.py``): packed documents are zigzagged one by one ('per_doc', balanced causal work) unless a
layer is 'linear', whose state passing needs contiguous chunks of the row: then the row is zigzagged as a whole
('global'), logged once.

Evaluation runs on every rank with ``ctx.parallel=None``: the CP entries then attend over the whole row locally.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import ConfigError

log = logging.getLogger(__name__)

CP_ATTENTION = ("ring", "ulysses", "hybrid")
"""Registry names of the softmax CP strategies (``parallel.strategy`` values)."""
STATE_PASSING = ("linear",)
"""Registry names that run context-parallel by state passing over the plan's CP group (any strategy)."""


@dataclass(frozen=True)
class ParallelSetup:
    """What a training stage needs from the parallel layout. For ``parallel.cp=1`` every group and ``shard_fn``
    is None (plain data parallel over the world), ``dp`` is the world size and ``dp_rank`` the global rank."""

    mesh: Any
    """The :class:`~longreach.parallel.mesh.Mesh` (None when parallel.cp=1)."""
    dp_group: Any
    """Data-parallel group handed to the trainer (None: the world)."""
    sp_group: Any
    """Context-parallel group handed to the trainer as DeepSpeed's sequence-parallel group (None: no CP)."""
    shard_fn: Optional[Callable]
    """``shard_fn(global_batch) -> (local_batch, AttnContext)`` (None: whole batches)."""
    attention_name: str
    """``model.attention`` after the CP substitution ('dense' -> the strategy's name; 'linear' stays)."""
    dp: int
    """Data-parallel degree: the number of distinct global batches per micro-step."""
    dp_rank: int
    """Which of those batches this rank reads (CP ranks of one replica share it)."""

    def trainer_kwargs(self) -> dict:
        """Keyword arguments for :class:`~longreach.launch.trainer.Trainer`."""
        if self.mesh is None:
            return {}
        return {"dp_group": self.dp_group, "sp_group": self.sp_group, "shard_fn": self.shard_fn}


def _layer_names(mc) -> list[str]:
    return [mc.attention, *(mc.attention_layers or {}).values()]


def _cp_options(mc, want: str, cp: int) -> dict:
    """``model.attention_options`` as it must read under CP: only 'linear' layers take options (see module doc)."""
    opts = dict(mc.attention_options or {})
    if not opts:
        return opts
    names = set(_layer_names(mc))
    keyed = all(isinstance(v, dict) for v in opts.values())
    if keyed:
        bad = {k: v for k, v in opts.items() if v and k not in STATE_PASSING}
        if bad:
            raise ConfigError(f"model.attention_options={bad} under parallel.cp={cp}: the context-parallel softmax "
                              f"attention '{want}' takes no options; keep only the 'linear' entry, or set "
                              "parallel.cp=1")
        return opts
    # flat options go to every non-'dense' layer; legal under CP only when those are exactly the linear ones
    if names & set(CP_ATTENTION) or not names & set(STATE_PASSING):
        raise ConfigError(f"model.attention_options={opts} under parallel.cp={cp} would reach the context-parallel "
                          f"softmax attention '{want}', which takes no options; key them by name, e.g. "
                          f"model.attention_options={{'linear': {opts}}}, or set parallel.cp=1")
    return {name: opts for name in STATE_PASSING}


def shard_layout(mc) -> str:
    """The shard plan's layout for model config ``mc``: 'global' when any layer is state-passing ('linear'),
    else 'per_doc' (see the module docstring)."""
    return "global" if set(_layer_names(mc)) & set(STATE_PASSING) else "per_doc"


def cp_attention_name(cfg) -> str:
    """``model.attention`` as the layers must run it under ``cfg.parallel`` ('dense' becomes the strategy's name;
    'linear' and the strategy's name stay); raises ConfigError for a plan that cannot run context-parallel (see
    the module docstring)."""
    par, mc = cfg.parallel, cfg.model
    if par.cp == 1:
        return mc.attention
    want = par.strategy
    ok = (want, *STATE_PASSING)
    if mc.attention not in ("dense", *ok):
        if mc.attention in CP_ATTENTION:
            fix = f"set model.attention={want} (or dense) or parallel.strategy={mc.attention}"
        else:
            fix = (f"'{mc.attention}' cannot run context-parallel in the trainer; set model.attention=dense (it becomes "
                   f"'{want}'), model.attention=linear, or parallel.cp=1")
        raise ConfigError(f"model.attention={mc.attention!r} does not match parallel.strategy={want!r} with "
                          f"parallel.cp={par.cp}; {fix}")
    bad = {k: v for k, v in (mc.attention_layers or {}).items() if v not in ok}
    if bad:
        raise ConfigError(f"model.attention_layers={bad} under parallel.cp={par.cp}: every layer must run the "
                          f"context-parallel attention '{want}' or 'linear' (a layer on one rank would only see its "
                          f"shard); set these entries to '{want}' (softmax) or 'linear', or set parallel.cp=1")
    _cp_options(mc, want, par.cp)
    return want if mc.attention == "dense" else mc.attention


def cp_model_config(cfg):
    """``cfg`` with ``model.attention`` set to :func:`cp_attention_name` and flat ``model.attention_options``
    keyed to 'linear' (each change logged). Call before the model is built; idempotent."""
    name = cp_attention_name(cfg)
    if cfg.parallel.cp == 1:
        return cfg
    opts = _cp_options(cfg.model, cfg.parallel.strategy, cfg.parallel.cp)
    if name == cfg.model.attention and opts == dict(cfg.model.attention_options or {}):
        return cfg
    if name != cfg.model.attention:
        log.info("parallel.cp=%d with parallel.strategy=%s: model.attention=%r becomes %r (the same softmax "
                 "attention, context-parallel)", cfg.parallel.cp, cfg.parallel.strategy, cfg.model.attention, name)
    if opts != dict(cfg.model.attention_options or {}):
        log.info("parallel.cp=%d: model.attention_options=%s becomes %s (only the linear layers take them)",
                 cfg.parallel.cp, dict(cfg.model.attention_options), opts)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=name, attention_options=opts))


def setup_parallel(cfg, dist, *, num_heads: int, num_kv_heads: int, comm: Any = None) -> ParallelSetup:
    """Check ``parallel.*`` against the launch (``dist.world``), the model's heads and ``data.seq_len``, then build
    the mesh once. Collective when ``parallel.cp > 1`` (every rank creates every group, in the same order).

    Args:
        cfg: ``RunConfig``; its ``model.attention`` may still be 'dense' (the returned ``attention_name`` says
            what the layers must run; :func:`cp_model_config` applies it).
        dist: ``DistInfo`` of this process.
        num_heads, num_kv_heads: the model's query / key-value head counts (after loading).
        comm: optional :class:`~longreach.parallel.comm_count.Comm` for the shard hook (tests count collectives).
    Raises ConfigError naming the field and the fix, before any group is created.
    """
    from .mesh import build_mesh, validate_parallel
    from .plan import make_shard_fn

    par = cfg.parallel
    name = cp_attention_name(cfg)
    if par.cp == 1:  # nothing is sharded (strategy / ulysses consistency is checked with the config)
        return ParallelSetup(mesh=None, dp_group=None, sp_group=None, shard_fn=None, attention_name=name,
                             dp=dist.world, dp_rank=dist.rank)
    try:
        # the one check of cp | world, strategy vs ulysses, heads vs ulysses, and the seq_len pad
        validate_parallel(cp=par.cp, ulysses=par.ulysses, strategy=par.strategy, world_size=dist.world,
                          num_heads=num_heads, num_kv_heads=num_kv_heads, seq_len=cfg.data.seq_len)
    except ConfigError:
        raise
    except ValueError as e:  # mesh/ulysses raise ValueError with the field and the fix: the user's error family
        raise ConfigError(str(e)) from None
    mesh = build_mesh(cp=par.cp, ulysses=par.ulysses, strategy=par.strategy, world_size=dist.world, rank=dist.rank)
    layout = shard_layout(cfg.model)
    if layout == "global":
        log.info("model has 'linear' layers: packed documents are sharded with one zigzag over the row (layout="
                 "'global'), since state passing needs contiguous chunks")
    return ParallelSetup(mesh=mesh, dp_group=mesh.dp_group, sp_group=mesh.cp_group,
                         shard_fn=make_shard_fn(mesh, comm=comm, layout=layout), attention_name=name, dp=mesh.dp,
                         dp_rank=mesh.dp_rank)
