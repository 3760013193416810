"""S2 backward in short q chunks (``triton.S2_BWD_CHUNK`` / OVERRIDE["s2_chunk"]): one dk/dv launch per chunk of q
rows, dk/dv summed in fp32, so the on-shard KV tiles (which see every later q row) read a chunk's q/dout together from
L2. Backward alone through tk.attention_backward, B1 Hq32 Hkv8 D128 causal bf16, S2 block 128 / window 2048 / sink 128
/ stride 8, variants FUSED:CHUNK (FUSED 1: dq by the dk/dv kernel's TMA reduce-adds, 0: the Triton dq kernel;
CHUNK 0: one launch), alternated over ROUNDS; each variant's grads against the first's.
PYTHONPATH=. python bench/experiments/s2_bwd/chunk.py
(LENS=32768,131072 VARIANTS=... ROUNDS=2; $OUT/s2_bwd_chunk.json)"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, alternate, backward_case  # noqa: E402
from longreach.kernels.flash import gluon_sm90_bwd as gb  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402

rows = Rows(os.environ.get("NAME", "s2_bwd_chunk"))
VARIANTS = os.environ.get("VARIANTS", "1:0,0:0,1:2048,1:4096,1:8192,1:16384").split(",")

for S in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
    run = backward_case(S, True)

    def use(var):
        fused, chunk = (int(x) for x in var.split(":"))
        tk.OVERRIDE.clear()
        tk.OVERRIDE.update(gluon_bwd=True, gluon_atomic_dq=bool(fused), s2_chunk=chunk or None)

    alternate(rows, run, VARIANTS, use, int(os.environ.get("ROUNDS", "2")), 100 if S < 100000 else 40, gb._BROKEN,
              S=S)
    tk.OVERRIDE.clear()
    torch.cuda.empty_cache()
