"""One Gluon sm_90 forward for Nsight Compute: S=$S tokens, S2=$S2 (0/1), B1 Hq32 Hkv8 D128 causal bf16, through
tk.attention_forward (the production dispatch; S2 packs the GQA group). Run by ncu_fwd.sh."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "flash_tma"))
from harness import forward_case  # noqa: E402

run = forward_case(int(os.environ.get("S", "32768")), os.environ.get("S2", "0") == "1")
for _ in range(2):  # (the first compiles; ncu -s 1 profiles the second)
    run()
torch.cuda.synchronize()
