"""The main job's install (``scripts/demo.sh``: no test extras) has no Triton on a CPU machine: the package must
import and every attention implementation must run its torch path without it."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r'''
import sys, importlib.abc

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoTriton())
import torch
import longreach.launch.cli, longreach.recipes.extend_context  # noqa: E401,F401  (the demo's imports)
from longreach.attention import registry
from longreach.attention.context import AttnContext

q, k = torch.randn(1, 40, 4, 16, requires_grad=True), torch.randn(1, 40, 2, 16, requires_grad=True)
cu = torch.tensor([0, 17, 40], dtype=torch.int32)
for name in ("dense", "flash", "s2", "linear"):
    opts = {"block": 16, "window": 16, "sink": 16, "stride": 2} if name == "s2" else {}
    m = registry.build(registry.AttnSpec(name, 0, 4, 2, 16, opts))
    out = m(q, k, k, ctx=AttnContext(causal=True, cu_seqlens=cu, max_seqlen=23))
    out.float().sum().backward()
    assert out.shape == q.shape and torch.isfinite(out).all(), name
assert "triton" not in sys.modules
print("OK")
'''


def test_package_runs_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
