"""Process-group start-up: torchrun's environment -> ``DistInfo``; gloo on CPU, NCCL on GPU.

DeepSpeed's communication layer is initialised on top of the torch process group we create, with its
CPU shared-memory collective op turned off (see ``_GlooOnlyCPUAccelerator``): that op is only used by
``inference_all_reduce`` and costs a ~60-75 s C++ JIT build on the first run of a fresh machine.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    world: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    device: torch.device
    """cuda:<local_rank> on GPU machines, cpu otherwise."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT of single-process runs and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _use_cpu_accelerator_without_shm_op() -> None:
    """Make DeepSpeed use its CPU accelerator, minus the shared-memory comm op.

    ``deepspeed.comm.TorchBackend.__init__`` asks the accelerator for ``ShareMemCommBuilder`` and JIT-compiles
    it (~60-75 s on 2 cores, once per machine) even when torch.distributed is already up; the op only serves
    ``inference_all_reduce``. Training collectives go through the gloo process group either way, so we hand
    DeepSpeed (via its public ``set_accelerator``) a CPU accelerator that reports no such builder.
    """
    from deepspeed.accelerator import set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    class _GlooOnlyCPUAccelerator(CPU_Accelerator):
        def create_op_builder(self, class_name):
            if class_name == "ShareMemCommBuilder":
                return None  # build_shm_op() then returns None and TorchBackend uses gloo only
            return super().create_op_builder(class_name)

        def communication_backend_name(self):
            return "gloo"

    set_accelerator(_GlooOnlyCPUAccelerator())


_SELF_FILLED = "LONGREACH_SINGLE_PROCESS_ENV"


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise torch.distributed and DeepSpeed's comm layer from torchrun's env vars.

    Started without a launcher (plain ``python``), it fills in a one-process job (RANK=0, WORLD_SIZE=1,
    LOCAL_RANK=0, MASTER_ADDR=127.0.0.1, a free MASTER_PORT) so DeepSpeed does not go looking for mpi4py.
    ``backend`` defaults to nccl when CUDA is available and gloo otherwise. Idempotent.
    """
    # a child process inherits the variables we filled in for its parent; those are not a launcher's
    # (a launcher that started us sets its own MASTER_PORT, so only an unchanged port marks inherited values)
    filled_port, _, filled_pid = os.environ.get(_SELF_FILLED, "::").partition(":")
    inherited = filled_port == os.environ.get("MASTER_PORT") and filled_pid != str(os.getpid())
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or inherited:
        port = free_port()
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ[_SELF_FILLED] = f"{port}:{os.getpid()}"
        log.info("no launcher environment: running as a single process (MASTER_PORT=%d)", port)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "deepspeed" not in sys.modules:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when deepspeed picks its accelerator
        _use_cpu_accelerator_without_shm_op()
    backend = backend or ("nccl" if on_gpu else "gloo")
    if not tdist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        tdist.init_process_group(backend=backend, rank=rank, world_size=world,
                                 timeout=timedelta(seconds=timeout_s), **kwargs)
    import deepspeed

    # torch.distributed is already up: DeepSpeed wraps the existing default group (no MPI discovery)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    """End a multi-process run cleanly: wait for every rank, then tear the process group down, so no rank exits
    while a peer's transport still talks to it (gloo aborts the survivor with SIGABRT otherwise). No-op without a
    process group."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    try:
        if tdist.get_world_size() > 1:
            tdist.barrier()
    finally:
        tdist.destroy_process_group()
