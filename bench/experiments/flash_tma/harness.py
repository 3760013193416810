"""Shared bits of the dev*.py experiment scripts: JSON rows under $OUT, median timing, relative error."""
import json
import os

import torch
from triton.testing import do_bench

OUT = os.environ.get("OUT", ".")


class Rows(list):
    """Results that print as they come and are rewritten to ``$OUT/<name>.json`` after each one."""

    def __init__(self, name: str):
        super().__init__()
        self.path = f"{OUT}/{name}.json"

    def rec(self, **r):
        self.append(r)
        print(json.dumps(r), flush=True)
        with open(self.path, "w") as f:
            json.dump(self, f, indent=1)


def bench(fn, rep=300):
    fn()
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def rel(x, y):
    return ((x.float() - y.float()).norm() / y.float().norm()).item()
