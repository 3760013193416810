"""Per-step metrics sinks owned by rank 0: ``metrics.jsonl`` and the progress bar; plus peak-memory probes."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

METRIC_FIELDS = ("step", "loss", "tokens", "tokens_per_s", "lr", "grad_norm", "peak_mem_bytes", "step_time_s", "skipped")
"""Keys of every metrics.jsonl line."""


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated since the last reset; on CPU the process's peak RSS (lifetime, not per step)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


class MetricsLog:
    """Appends one JSON line per step to ``path`` and drives an optional tqdm bar. Only build it on rank 0."""

    def __init__(self, path: Path, *, total_steps: int, start_step: int, progress: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step - 1, desc="train", unit="step", dynamic_ncols=True)

    def rewrite(self, history: list[dict]) -> None:
        """Replace the file by ``history`` (on resume: drops lines of steps after the checkpoint)."""
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in history))
        tmp.replace(self.path)

    def write(self, m: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(m) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}", lr=f"{m['lr']:.2e}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(path: Path) -> list[dict]:
    """All lines of a metrics.jsonl file."""
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
