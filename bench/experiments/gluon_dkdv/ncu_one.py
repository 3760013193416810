"""One backward (hybrid: Gluon dk/dv + Triton dq) for ncu: S=$S, S2=$S2 (0/1), MODE=$MODE (1: the fused dq).
ncu --clock-control none -k regex:dkdv --metrics ... python bench/experiments/gluon_dkdv/ncu_one.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "flash_tma"))
from harness import backward_case  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402

mode = int(os.environ.get("MODE", "0"))
tk.OVERRIDE.update(gluon_bwd=True, gluon_atomic_dq=mode != 0)
backward_case(int(os.environ.get("S", "32768")), os.environ.get("S2", "1") == "1")()
torch.cuda.synchronize()
