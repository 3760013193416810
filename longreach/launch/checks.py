"""Pre-flight checks that need the loaded model: run before the first step. (``parallel.*`` against the world
and the model is checked by :func:`longreach.parallel.setup.setup_parallel`.)"""

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

