"""Atomic checkpoints: DeepSpeed's files plus our small trainer state, published by rename.

Layout under ``run_dir/checkpoints``::

    step_00000012/           DeepSpeed engine files (model, optimizer, scheduler) + trainer_state.json + rng_rank{r}.pt
    step_00000012.tmp/       a save in progress (or one a crash interrupted): ignored, deleted by the next save/resume
    latest                   text file with the name of the newest complete checkpoint

A save writes everything into ``<name>.tmp``, fsyncs it, renames it to ``<name>`` and only then replaces
``latest`` (write temp + fsync + os.replace). A kill at any point leaves ``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """What the loop needs beyond DeepSpeed's files to continue exactly."""

    step: int
    """Last completed optimizer step (1-based)."""
    data_position: int
    """Micro-batches consumed from this rank's batch iterator (equal on every rank)."""
    metrics: list = field(default_factory=list)
    """Metric lines of every step so far."""


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [path, *sorted(q for q in path.rglob("*") if q.is_dir())]:
        _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves/loads checkpoints of a DeepSpeed engine. ``save`` and ``load`` are collective over ``group``."""

    def __init__(self, root: Path, *, rank: int, keep: int, group: Optional[tdist.ProcessGroup] = None):
        self.root = Path(root)
        self.rank = rank
        self.keep = keep
        self.group = group

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:08d}"

    def _barrier(self) -> None:
        if tdist.is_initialized():
            tdist.barrier(group=self.group)

    def latest(self) -> Optional[Path]:
        """The complete checkpoint named by ``latest``, or None."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{pointer} names {path.name} but {path / STATE_FILE} is missing; "
                                    "the checkpoint directory was edited by hand: fix 'latest' or set train.resume=false")
        return path

    def clean_partial(self) -> None:
        """Delete ``*.tmp`` directories left by interrupted saves (rank 0)."""
        if self.rank != 0 or not self.root.is_dir():
            return
        for p in self.root.glob("*.tmp"):
            log.warning("removing partial checkpoint %s (an interrupted save)", p)
            shutil.rmtree(p, ignore_errors=True)

    def save(self, engine, state: TrainState) -> Path:
        """Write checkpoint ``step_<state.step>`` atomically; returns its final path."""
        final = self.root / self.name(state.step)
        tmp_tag = final.name + ".tmp"
        tmp = self.root / tmp_tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self.clean_partial()
            if final.exists():  # re-saving a step (e.g. a resumed run ending on it): replace it atomically too
                log.info("checkpoint %s exists; it is replaced", final)
        self._barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        self._barrier()  # every rank's files are in tmp
        if self.rank == 0:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            pointer_tmp = self.root / "latest.tmp"
            with open(pointer_tmp, "w") as f:
                f.write(final.name)
                f.flush()
                os.fsync(f.fileno())
            os.replace(pointer_tmp, self.root / "latest")
            _fsync_dir(self.root)
            self._prune(keep_name=final.name)
            log.info("saved checkpoint %s", final)
        self._barrier()
        return final

    def _prune(self, keep_name: str) -> None:
        done = sorted((int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _NAME.match(p.name)))
        for _, p in done[:-self.keep]:
            if p.name != keep_name:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, path: Path) -> TrainState:
        """Load engine (model, optimizer, LR schedule) and RNG states; returns our trainer state."""
        load_path, _ = engine.load_checkpoint(str(self.root), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}; set train.resume=false to start over")
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("%s has no RNG state for rank %d (world size changed?); RNG not restored", path, self.rank)
        state = TrainState(**json.loads((path / STATE_FILE).read_text()))
        self._barrier()
        return state
