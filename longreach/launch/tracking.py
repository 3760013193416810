"""Weights & Biases logging that never stops or blocks a run.

Mode ``auto`` goes online only when an API key is configured (WANDB_API_KEY or a netrc entry for api.wandb.ai)
and offline otherwise; offline mode makes no network call. Every wandb failure becomes one warning and the run
goes on without W&B.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any, Optional

from .config import TrackingConfig

log = logging.getLogger(__name__)


def _has_login() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(cfg: TrackingConfig) -> str:
    """online | offline | disabled, from tracking.wandb / tracking.mode / the login state."""
    if not cfg.wandb or cfg.mode == "disabled":
        return "disabled"
    if cfg.mode == "auto":
        return "online" if _has_login() else "offline"
    return cfg.mode


class Tracker:
    """Thin W&B wrapper; a no-op when disabled, on non-zero ranks, or after any wandb error."""

    def __init__(self, cfg: TrackingConfig, *, run_dir: Path, name: str, config: dict[str, Any], enabled: bool = True):
        self.run = None
        mode = resolve_mode(cfg) if enabled else "disabled"
        if mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(project=cfg.project, name=name, dir=str(run_dir), config=config, mode=mode,
                                  resume="allow", settings=wandb.Settings(init_timeout=60, silent=True))
            log.info("W&B %s run in %s", mode, run_dir)
        except Exception as e:  # wandb raises many types (network, auth, service start-up)
            log.warning("W&B disabled for this run: wandb.init(mode=%s) failed: %s", mode, e)
            self.run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({f"train/{k}": v for k, v in metrics.items() if k != "step" and v is not None}, step=step)
        except Exception as e:
            log.warning("W&B logging failed at step %d, disabling W&B: %s", step, e)
            self.run = None

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:
            log.warning("W&B finish failed: %s", e)
        self.run = None
