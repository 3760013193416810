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
* ``parallel.cp>1``: every decoder layer must run the strategy's registry entry ('ring' | 'ulysses' | 'hybrid',
  all exact softmax attention, dispatching on the ``CPAttnInfo`` the shard plan puts in ``ctx.parallel``).
  ``model.attention='dense'`` (the default) is read as "plain softmax attention" and becomes the strategy's name,
  logged once. ``model.attention`` equal to the strategy's name is taken as is. Anything else is refused before
  the model is built: another CP strategy's name (the plan would shard for one layout and the layer expect
  another), a single-rank implementation ('flash', 's2': they would attend within the local shard only), 'linear'
  (its state-passing CP uses a different context, not wired into the trainer), and any ``model.attention_layers``
  entry other than the strategy's name, including an explicit 'dense' (a per-layer override is a deliberate
  choice, so it is not silently rewritten).

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
    """Registry name every softmax layer must use (``model.attention`` after the CP substitution)."""
    dp: int
    """Data-parallel degree: the number of distinct global batches per micro-step."""
    dp_rank: int
    """Which of those batches this rank reads (CP ranks of one replica share it)."""

    def trainer_kwargs(self) -> dict:
        """Keyword arguments for :class:`~longreach.launch.trainer.Trainer`."""
        if self.mesh is None:
            return {}
        return {"dp_group": self.dp_group, "sp_group": self.sp_group, "shard_fn": self.shard_fn}


def cp_attention_name(cfg) -> str:
    """The registry name the model's layers must use under ``cfg.parallel``; raises ConfigError for a plan that
    cannot run context-parallel (see the module docstring)."""
    par, mc = cfg.parallel, cfg.model
    if par.cp == 1:
        return mc.attention
    want = par.strategy
    if mc.attention not in ("dense", want):
        if mc.attention in CP_ATTENTION:
            fix = f"set model.attention={want} (or dense) or parallel.strategy={mc.attention}"
        else:
            fix = (f"'{mc.attention}' cannot run context-parallel in the trainer; set model.attention=dense (it becomes "
                   f"'{want}') or parallel.cp=1")
        raise ConfigError(f"model.attention={mc.attention!r} does not match parallel.strategy={want!r} with "
                          f"parallel.cp={par.cp}; {fix}")
    bad = {k: v for k, v in (mc.attention_layers or {}).items() if v != want}
    if bad:
        raise ConfigError(f"model.attention_layers={bad} under parallel.cp={par.cp}: every layer must run the "
                          f"context-parallel attention '{want}' (a layer on one rank would only see its shard); "
                          f"remove these entries or set them to '{want}', or set parallel.cp=1")
    if mc.attention_options:
        raise ConfigError(f"model.attention_options={dict(mc.attention_options)} is set, but the context-parallel "
                          f"attention '{want}' takes no options; remove model.attention_options or set parallel.cp=1")
    return want


def cp_model_config(cfg):
    """``cfg`` with ``model.attention`` set to :func:`cp_attention_name` (logged when it changes). Call before the
    model is built; idempotent."""
    name = cp_attention_name(cfg)
    if name == cfg.model.attention:
        return cfg
    log.info("parallel.cp=%d with parallel.strategy=%s: model.attention=%r becomes %r (the same softmax attention, "
             "context-parallel)", cfg.parallel.cp, cfg.parallel.strategy, cfg.model.attention, name)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=name))


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
    return ParallelSetup(mesh=mesh, dp_group=mesh.dp_group, sp_group=mesh.cp_group,
                         shard_fn=make_shard_fn(mesh, comm=comm), attention_name=name, dp=mesh.dp,
                         dp_rank=mesh.dp_rank)
