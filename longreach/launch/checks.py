"""Pre-flight checks that need the loaded model or the process world: run before the first step."""

from __future__ import annotations

from .config import ConfigError, RunConfig


def check_lengths(cfg: RunConfig, max_positions: int) -> None:
    """Every length the run will feed the model must fit its (scaled) context window."""
    if cfg.data.seq_len > max_positions:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's context of {max_positions} tokens; "
            f"lower data.seq_len or extend the context with model.rope_scaling.type=yarn "
            f"model.rope_scaling.factor={-(-cfg.data.seq_len // max_positions) * 1.0 * _factor(cfg)}"
        )
    for field, lengths in (("eval.ppl_lengths", cfg.eval.ppl_lengths), ("eval.passkey_lengths", cfg.eval.passkey_lengths)):
        too_long = [n for n in lengths if n > max_positions]
        if too_long:
            raise ConfigError(
                f"{field} has lengths {too_long} beyond the model's context of {max_positions} tokens; "
                "drop them or raise model.rope_scaling.factor"
            )


def _factor(cfg: RunConfig) -> float:
    rs = cfg.model.rope_scaling
    return rs.factor if rs.type != "none" else 1.0


def check_world(cfg: RunConfig, world_size: int) -> None:
    cp = cfg.parallel.cp
    if world_size % cp:
        raise ConfigError(
            f"parallel.cp={cp} does not divide the world size {world_size}; launch a multiple of {cp} processes "
            f"(torchrun --nproc_per_node) or set parallel.cp to a divisor of {world_size}"
        )
