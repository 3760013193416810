"""Chunked backward without the fp32 fills and copies (2026-12-04): ``triton.CHUNK_SPLIT`` on / off, rounds
alternated. On: each KV tile's first q chunk stores its fp32 dk/dv sums, its last writes the grads (no zero fill, no
fp32-to-bf16 copy), and each chunk's fp32 dq rows are zeroed before it and copied out after it on a side stream,
under the next chunk's kernel. First ``check_sm90_backward`` with each setting (its single-document chunked cases
take the new path), then the backward alone through tk.attention_backward, B1 Hq32 Hkv8 D128 causal bf16 (S2: block
128, window 2048, sink 128, stride 8), each variant's grads against the first's.
PYTHONPATH=. python bench/experiments/s2_bwd/split.py
(VARIANTS="CHUNK_SPLIT=1,CHUNK_SPLIT=0" CASES=s2:32768,s2:131072,dense:131072 ROUNDS=3; $OUT/s2_bwd_split.json)"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, alternate, backward_case, check_variants, knob_variants  # noqa: E402
from longreach.kernels.flash import gluon_sm90_bwd as gb  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402
from longreach.launch.bench.kernels import check_sm90_backward  # noqa: E402

rows = Rows(os.environ.get("NAME", "s2_bwd_split"))
VARIANTS, use = knob_variants(tk, os.environ.get("VARIANTS", "CHUNK_SPLIT=1,CHUNK_SPLIT=0"))

check_variants(rows, VARIANTS, use, check_sm90_backward, gb._BROKEN)

for case in os.environ.get("CASES", "s2:32768,s2:131072,dense:131072").split(","):
    kind, S = case.split(":")
    S = int(S)
    run = backward_case(S, kind == "s2")
    alternate(rows, run, VARIANTS, use, int(os.environ.get("ROUNDS", "3")), 400 if S < 100000 else 2000,
              gb._BROKEN, S=S, kind=kind)
    use(VARIANTS[0])
    torch.cuda.empty_cache()
use(None)
