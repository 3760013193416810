import os

import torch

if not torch.cuda.is_available():
    # run the real Triton kernels in the interpreter on CPU; must be set before any @triton.jit decorates
    os.environ.setdefault("TRITON_INTERPRET", "1")
