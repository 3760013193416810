"""The training loop: DeepSpeed owns the optimizer step, ZeRO, precision, clipping and checkpoint files;
longreach owns the loop, the loss normalisation, the metrics and the atomic checkpoint pointer.

Loss normalisation: every micro-batch contributes ``sum of its token losses / N`` where N is the number of
real (label != -100) tokens of the whole optimizer step, all-reduced over every rank of the step (data- and
sequence-parallel) and every micro-batch of the step. The resulting gradient does not depend on how the
tokens were split across ranks, micro-batches or sequence shards. DeepSpeed sums gradients over every rank
holding the same parameters (dp x sp) and then divides by a stage-dependent count
(:func:`deepspeed_grad_divisor`), so the backward loss is multiplied by that count to turn its mean into our
sum: the applied gradient is the true global token-mean gradient, the same for any dp x cp split.

NaN/inf (train.nan_policy): a non-finite loss is detected after each micro-batch's forward, before its
backward (the check is a collective, so all ranks agree). ``stop`` raises naming the step. ``skip`` drops the
whole step: the remaining micro-batches of the step are consumed but not run, gradients already accumulated
by earlier micro-batches are discarded (no reduction has happened yet: the accumulation boundary is the last
micro-batch), ``engine.step()`` is not called, so weights, optimizer moments and the LR schedule do not move
(the schedule position counts applied updates, as DeepSpeed does for its own overflow skips). The step number
and the data position still advance, and the metrics line says ``skipped: true``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as tdist
from omegaconf import OmegaConf
from torch import nn

from ..attention.context import AttnContext
from ..data.batch import Batch
from .checkpoint import CheckpointManager, TrainState
from .config import ConfigError, RunConfig, to_yaml
from .dist import DistInfo
from .metrics import MetricsLog, peak_memory_bytes, reset_peak_memory
from .schedule import build_scheduler
from .tracking import Tracker

log = logging.getLogger(__name__)

ShardFn = Callable[[Batch], "tuple[Batch, AttnContext]"]


def identity_shard(batch: Batch) -> tuple[Batch, AttnContext]:
    """Default shard plan (no context parallelism): the whole batch, its own attention context."""
    return batch, batch.attn_context()


class LossModule(nn.Module):
    """What DeepSpeed wraps: forward = ``model.loss_sum``, so ZeRO-3's module hooks see a normal forward.

    ``model`` must provide ``loss_sum(input_ids, labels, position_ids, ctx) -> (loss_sum fp32 [], count int [])``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids, ctx):
        return self.model.loss_sum(input_ids, labels, position_ids, ctx)


class ParallelGroups:
    """DeepSpeed ``mpu`` adapter for a dp x sp (context-parallel) job without tensor/pipeline parallelism.

    DeepSpeed 0.19 reduces gradients, and partitions ZeRO state, over the *sequence-data-parallel* group
    (all ranks holding the same parameters, here the whole world); there is no supported way to shard ZeRO
    over dp only and still sum the sequence-parallel ranks' partial gradients (see
    runtime/zero/stage_1_and_2.py ``average_tensor``). What it divides the sum by depends on the stage
    (:func:`deepspeed_grad_divisor`). ZeRO-3 parameters are partitioned over that same group by the Trainer
    (see ``Trainer.__init__``). ``model_group`` is this rank's singleton group, used by DeepSpeed's grad-norm
    all-reduce across model-parallel ranks (there are none).

    Context parallelism: ``longreach.parallel.setup.setup_parallel`` builds ``dp_group`` (mesh.dp_group) and
    ``sp_group`` (mesh.cp_group) and the ``shard_fn``; ``ParallelSetup.trainer_kwargs()`` passes them here.
    """

    def __init__(self, *, dp_group, sp_group, model_group, world_group):
        self.dp_group, self.sp_group, self.model_group, self.world_group = dp_group, sp_group, model_group, world_group

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_world_size(self):
        return tdist.get_world_size(self.dp_group)

    def get_data_parallel_rank(self):
        return tdist.get_rank(self.dp_group)

    def get_model_parallel_group(self):
        return self.model_group

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0

    def get_sequence_parallel_group(self):
        return self.sp_group

    def get_sequence_parallel_world_size(self):
        return tdist.get_world_size(self.sp_group)

    def get_sequence_parallel_rank(self):
        return tdist.get_rank(self.sp_group)

    def get_sequence_data_parallel_group(self):
        return self.world_group

    def get_sequence_data_parallel_world_size(self):
        return tdist.get_world_size(self.world_group)

    def get_sequence_data_parallel_rank(self):
        return tdist.get_rank(self.world_group)


def resolve_bf16(cfg: RunConfig, device: torch.device) -> bool:
    """train.precision -> bf16 on/off; raises when bf16 is asked of a device that cannot run it."""
    p = cfg.train.precision
    if p == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    if p == "bf16" and device.type == "cuda" and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        raise ConfigError(f"train.precision=bf16 but {device} does not support bfloat16 (needs compute capability >= 8.0); "
                          "use train.precision=fp32")
    return p == "bf16"


def select_trainable(model: nn.Module, which: str) -> int:
    """Freeze every parameter outside ``which`` (all | attention | feature_maps); returns trainable numel."""
    def keep(name: str) -> bool:
        if which == "all":
            return True
        if which == "attention":
            return ".self_attn." in name
        return ".self_attn.impl." in name  # feature maps live inside the attention implementation module

    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name))
        n += p.numel() if p.requires_grad else 0
    if n == 0:
        raise ConfigError(f"train.trainable={which} matches no parameter of this model "
                          f"(attention implementations: {sorted(set(getattr(model, 'attention_names', [])))}); "
                          "use train.trainable=all or an attention with learned feature maps")
    return n


def deepspeed_grad_divisor(zero_stage: int, *, dp: int, sp: int) -> int:
    """What DeepSpeed 0.19 divides a gradient by after summing it over its sequence-data-parallel group (the
    ``dp x sp`` ranks holding the same parameters), read from its source:

    * ZeRO-0 (``engine._reduce_non_expert_gradients``) and ZeRO-1/2 (``stage_1_and_2.average_tensor`` and
      ``gradient_reduction_w_predivide``): by ``world(sdp) / sp = dp``;
    * ZeRO-3 with ``reduce_scatter`` (pinned on by :func:`build_ds_config`): ``stage3.__avg_scatter_grads`` ->
      ``reduce_scatter_coalesced`` pre-divides by the partition group's size ``dp * sp`` and applies no
      sequence-parallel correction (only its ``reduce_scatter=false`` path divides by ``dp``).

    tests/dist/test_cp_trainer.py holds CP=1 and CP=k gradient norms equal under ZeRO-1 and ZeRO-3, so a change of
    DeepSpeed's rule fails there.
    """
    return dp * sp if zero_stage == 3 else dp


def check_run(cfg: RunConfig, *, dist: DistInfo, dp_size: int, sp_size: int, shard_fn_given: bool) -> None:
    """Checks that need the devices and groups; run before any DeepSpeed work so bad input fails fast.

    ``parallel.*`` itself (cp | world, heads, strategy, seq_len) is checked by
    :func:`longreach.parallel.setup.setup_parallel`, which builds the groups; here only that the groups given
    match the config."""
    cp = cfg.parallel.cp
    if sp_size != cp or (cp > 1 and not shard_fn_given):
        raise ConfigError(f"parallel.cp={cp} needs a sequence-parallel group of {cp} ranks and a shard_fn "
                          f"(got a group of {sp_size}, shard_fn={'set' if shard_fn_given else 'none'}); "
                          "build them with longreach.parallel.setup_parallel (world size "
                          f"{dist.world}) or set parallel.cp to the group's size")
    if dp_size * sp_size != dist.world:
        raise ValueError(f"dp_group ({dp_size} ranks) x sp_group ({sp_size} ranks) must cover the world ({dist.world})")
    if cfg.train.offload_optimizer and dist.device.type != "cuda":
        raise ConfigError(f"train.offload_optimizer=true with train.zero_stage={cfg.train.zero_stage} offloads to the CPU, "
                          f"but training already runs on {dist.device}; DeepSpeed would JIT-build its CPU Adam for "
                          "nothing: set train.offload_optimizer=false")
    resolve_bf16(cfg, dist.device)


def build_ds_config(cfg: RunConfig, *, bf16: bool) -> dict:
    """DeepSpeed JSON config from ``cfg.train`` (the optimizer and scheduler are passed as objects)."""
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero["reduce_scatter"] = True  # the gradient divisor depends on this path (deepspeed_grad_divisor)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW as the client optimizer
        "steps_per_print": 10**9,  # our metrics replace DeepSpeed's progress prints
        "wall_clock_breakdown": False,
    }


class Trainer:
    """Runs ``cfg.train.steps`` optimizer steps of a model with DeepSpeed.

    ``dp_group``/``sp_group``: data- and sequence(context)-parallel groups (None, None = plain data parallel
    over the world). ``shard_fn(batch) -> (local batch, AttnContext)`` cuts each micro-batch for this rank
    (the context-parallel shard plan); the default keeps it whole. ``on_checkpoint(step, path)`` is called
    on every rank after a checkpoint is complete (tests use it to kill the process there).
    ``save_checkpoints=False`` writes none (benchmarks).
    """

    def __init__(self, cfg: RunConfig, model: nn.Module, *, dist: DistInfo, dp_group=None, sp_group=None,
                 shard_fn: Optional[ShardFn] = None, on_checkpoint: Optional[Callable[[int, os.PathLike], None]] = None,
                 save_checkpoints: bool = True):
        import deepspeed

        self.cfg, self.dist = cfg, dist
        self.world_group = tdist.group.WORLD  # dp x sp: every rank of an optimizer step
        if sp_group is not None and dp_group is None:
            raise ValueError("Trainer(sp_group=...) also needs dp_group (the ranks holding other data)")
        dp_size = tdist.get_world_size(dp_group) if dp_group is not None else dist.world
        sp_size = tdist.get_world_size(sp_group) if sp_group is not None else 1
        check_run(cfg, dist=dist, dp_size=dp_size, sp_size=sp_size, shard_fn_given=shard_fn is not None)
        self.shard_fn = shard_fn or identity_shard
        self.on_checkpoint = on_checkpoint
        self.save_checkpoints = save_checkpoints  # False: benchmarks (no files, no resume)
        self.bf16 = resolve_bf16(cfg, dist.device)
        self.run_dir = cfg.run_dir
        t = cfg.train

        mpu = None
        if dp_group is not None:
            # singleton groups are created collectively by every rank, each keeps its own
            singles = [tdist.new_group([r]) for r in range(dist.world)]
            sp = sp_group if sp_group is not None else singles[dist.rank]
            mpu = ParallelGroups(dp_group=dp_group, sp_group=sp, model_group=singles[dist.rank], world_group=self.world_group)
        # DeepSpeed divides the gradient summed over dp x sp; we undo it (see module docstring)
        self.grad_avg_size = deepspeed_grad_divisor(t.zero_stage, dp=dp_size, sp=sp_size)

        model.gradient_checkpointing = t.activation_checkpointing
        n_train = select_trainable(model, t.trainable)
        self.model = model.to(dist.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        log.info("trainable parameters: %d (train.trainable=%s); precision %s; ZeRO-%d",
                 n_train, t.trainable, "bf16" if self.bf16 else "fp32", t.zero_stage)
        ds_config = build_ds_config(cfg, bf16=self.bf16)
        if t.zero_stage == 3 and mpu is not None:
            # DeepSpeed 0.19 partitions ZeRO-3 parameters over mpu.get_data_parallel_group() (dp only:
            # zero/parameter_offload.py _convert_to_zero_parameters) but reduce-scatters their gradients over the
            # sequence-data-parallel group (dp x sp: stage3.py __avg_scatter_grads); with sp > 1 the two disagree
            # and the applied gradient is wrong. Partitioning over dp x sp first, through the public
            # zero.Init(module=...), makes both use one group (DeepSpeed then skips its own conversion).
            deepspeed.zero.Init(module=self.model, data_parallel_group=self.world_group, config_dict_or_path=ds_config,
                                mpu=mpu, mem_efficient_linear=False,  # no process-wide F.linear replacement
                                dtype=torch.bfloat16 if self.bf16 else next(self.model.parameters()).dtype)
        opt_kwargs = dict(lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, eps=1e-8)
        if t.offload_optimizer:
            # ZeRO-offload refuses client optimizers: DeepSpeed's own AdamW becomes DeepSpeedCPUAdam
            ds_config["optimizer"] = {"type": "AdamW", "params": {**opt_kwargs, "betas": list(t.betas)}}
            optimizer = None
        else:
            optimizer = torch.optim.AdamW(params, **opt_kwargs)

        def scheduler(opt):
            return build_scheduler(opt, warmup=t.warmup_steps, total=t.steps, min_ratio=t.min_lr_ratio)

        self.engine, _, _, _ = deepspeed.initialize(
            model=LossModule(self.model), model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler,
            config=ds_config, mpu=mpu, dist_init_required=False)
        self._zero0_fp32 = t.zero_stage == 0 and not self.bf16
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", rank=dist.rank, keep=t.keep_checkpoints,
                                      group=self.world_group)
        self.history: list[dict] = []
        self.data_position = 0

    # ----------------------------------------------------------------- resume
    def resume(self) -> Optional[TrainState]:
        """Load the latest complete checkpoint when train.resume is on; None when there is none."""
        self.ckpt.clean_partial()
        if not (self.cfg.train.resume and self.save_checkpoints):
            return None
        path = self.ckpt.latest()
        if path is None:
            return None
        state = self.ckpt.load(self.engine, path)
        self.history = list(state.metrics)
        self.data_position = state.data_position
        log.info("resumed from %s: step %d done, data position %d micro-batches", path, state.step, state.data_position)
        return state

    # ----------------------------------------------------------------- loop
    def train(self, batches: Iterator[Batch], *, start_step: Optional[int] = None) -> list[dict]:
        """Run steps ``start_step..cfg.train.steps``; returns the metrics of every step of the run so far.

        ``start_step=None`` resumes from the run directory's latest checkpoint (train.resume) and fast-forwards
        ``batches`` by the saved data position; an explicit ``start_step`` means the caller positioned ``batches``.
        """
        cfg, t = self.cfg, self.cfg.train
        batches = iter(batches)
        if start_step is None:
            state = self.resume()
            start_step = 1 if state is None else state.step + 1
            if state is not None and state.data_position:
                # the iterator restarts at the beginning: skip what the checkpointed steps consumed
                next(itertools.islice(batches, state.data_position - 1, None), None)
        main = self.dist.is_main
        sink = tracker = None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            sink = MetricsLog(self.run_dir / "metrics.jsonl", total_steps=t.steps, start_step=start_step,
                              progress=cfg.tracking.progress)
            sink.rewrite(self.history)
        tracker = Tracker(cfg.tracking, run_dir=self.run_dir, name=cfg.name,
                          config=OmegaConf.to_container(OmegaConf.structured(cfg)), enabled=main)
        self.engine.train()
        try:
            for step in range(start_step, t.steps + 1):
                m = self._step(batches, step)
                self.history.append(m)
                if main and (step % t.log_every == 0 or step == t.steps or m["skipped"]):
                    sink.write(m)
                    tracker.log(m, step)
                if self.save_checkpoints and ((t.save_every and step % t.save_every == 0) or step == t.steps):
                    path = self.ckpt.save(self.engine, TrainState(step=step, data_position=self.data_position,
                                                                  metrics=self.history))
                    if self.on_checkpoint is not None:
                        self.on_checkpoint(step, path)
        finally:
            if sink is not None:
                sink.close()
            tracker.finish()
        return self.history

    def _next_micro_batches(self, batches: Iterator[Batch], step: int) -> list[Batch]:
        out = list(itertools.islice(batches, self.cfg.train.grad_accum))
        self.data_position += len(out)
        if len(out) < self.cfg.train.grad_accum:
            raise RuntimeError(f"the batch iterator ran out at step {step} (needs train.grad_accum="
                               f"{self.cfg.train.grad_accum} micro-batches per step); lower train.steps or add data")
        return out

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        tdist.all_reduce(x, group=self.world_group)
        return x

    def _step(self, batches: Iterator[Batch], step: int) -> dict:
        """One optimizer step over grad_accum micro-batches; returns its metrics line."""
        t, dev, engine = self.cfg.train, self.dist.device, self.engine
        reset_peak_memory(dev)
        t0 = time.perf_counter()
        local = [self.shard_fn(b.to(dev)) for b in self._next_micro_batches(batches, step)]
        # global real-token count of the step: all micro-batches, all dp x sp ranks
        count = self._all_reduce(torch.tensor([sum(int((b.labels != -100).sum()) for b, _ in local)], device=dev,
                                              dtype=torch.float64))
        n_tokens = int(count.item())
        if n_tokens == 0:
            raise RuntimeError(f"step {step} has no tokens with a label (all labels are -100): check the data pipeline")
        scale = self.grad_avg_size / n_tokens
        lr = engine.optimizer.param_groups[0]["lr"]
        loss_total = 0.0
        skipped = False
        for i, (b, ctx) in enumerate(local):
            engine.set_gradient_accumulation_boundary(i == len(local) - 1)
            loss_sum, _ = engine(b.input_ids, b.labels, b.position_ids, ctx)
            glob = self._all_reduce(loss_sum.detach().to(torch.float64).reshape(1))
            if not torch.isfinite(glob).all():
                if t.nan_policy == "stop":
                    raise FloatingPointError(
                        f"non-finite loss at step {step} (micro-batch {i}) and train.nan_policy=stop; "
                        "set train.nan_policy=skip to drop such steps, or lower train.lr")
                skipped = True
                if i > 0 and not self._zero0_fp32:
                    self._poison_and_drop(loss_sum * scale, step)
                break
            loss_total += float(glob.item())
            engine.backward(loss_sum * scale, scale_wrt_gas=False)
        grad_norm = None
        if skipped:
            self._discard_gradients()  # nothing reached DeepSpeed's accumulators, or _poison_and_drop cleared them
            log.warning("step %d: non-finite loss, step dropped (train.nan_policy=skip): no update, "
                        "LR schedule not advanced", step)
        else:
            grad_norm, skipped = self._optimizer_step(step)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        return {
            "step": step,
            "loss": None if skipped else loss_total / n_tokens,
            "tokens": n_tokens,
            "tokens_per_s": n_tokens / dt,
            "lr": lr,
            "grad_norm": grad_norm,
            "peak_mem_bytes": peak_memory_bytes(dev),
            "step_time_s": dt,
            "skipped": skipped,
        }

    def _optimizer_step(self, step: int) -> tuple[Optional[float], bool]:
        """engine.step() unless the gradient norm is non-finite; returns (grad norm, skipped)."""
        policy = self.cfg.train.nan_policy

        def bad(detail: str) -> FloatingPointError:
            return FloatingPointError(f"non-finite gradient norm at step {step} with train.nan_policy={policy}; {detail}")

        # ZeRO-0 fp32 hands the step to the torch optimizer, which neither reports nor checks the norm; its
        # gradients are already all-reduced after the boundary backward, so we measure them before the update
        if self._zero0_fp32:
            norm = self._grad_norm_zero0()
            if not math.isfinite(norm):
                if policy == "stop":
                    raise bad("set train.nan_policy=skip to drop such steps, or lower train.lr")
                self._discard_gradients()
                log.warning("step %d: non-finite gradient norm, step dropped (train.nan_policy=skip)", step)
                return None, True
            self.engine.step()
            return norm, False
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        if norm is None or math.isfinite(norm):
            return norm, False
        if self.engine.was_step_applied():
            raise bad("DeepSpeed applied the update, so the weights are corrupt: resume from the last checkpoint "
                      "with a lower train.lr")
        if policy == "stop":
            raise bad("DeepSpeed skipped the update; set train.nan_policy=skip to go on past such steps")
        log.warning("step %d: non-finite gradient norm, DeepSpeed skipped the update (train.nan_policy=skip)", step)
        return None, True

    def _poison_and_drop(self, nan_loss: torch.Tensor, step: int) -> None:
        """Drop a step whose earlier micro-batches DeepSpeed already folded into its accumulators.

        ZeRO-1/2/3 and the bf16 optimizer reduce (or copy to fp32) every micro-batch's gradient into internal
        buffers, which zero_grad does not reach. Backwarding the non-finite loss makes the step's gradient norm
        non-finite, and DeepSpeed's own overflow path then clears those buffers and skips the update and the
        LR-scheduler step.
        """
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.backward(nan_loss, scale_wrt_gas=False)
        self.engine.step()
        if self.engine.was_step_applied():
            raise RuntimeError(f"step {step}: DeepSpeed applied an update with a non-finite gradient; "
                               "set train.nan_policy=stop")

    def _grad_norm_zero0(self) -> float:
        norms = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _discard_gradients(self) -> None:
        # the boundary is the last micro-batch, so nothing was reduced yet: local accumulations only
        opt = self.engine.optimizer
        if hasattr(opt, "zero_grad"):
            opt.zero_grad(set_to_none=True)
        self.engine.zero_grad()
