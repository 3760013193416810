"""The communication calls of the CP strategies, through one small object that counts them.

Strategies never call ``torch.distributed`` collectives directly: they go through a ``Comm`` passed in the
``CPAttnInfo``, so tests (and the benchmark) can assert that a forward/backward issues exactly the collectives
the schedule says, and an accidental extra gather fails a test. Counting is a dict increment: always on.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
import torch.distributed as dist


class Comm:
    """Counted wrappers over the collectives the strategies use.

    ``counts`` maps an op name ('p2p_batch', 'all_to_all') to the number of calls; ``bytes`` to bytes sent
    by this rank.
    """

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.bytes: Counter = Counter()

    def reset(self) -> None:
        self.counts.clear()
        self.bytes.clear()

    def ring_exchange(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], *, group: dist.ProcessGroup,
                      tag: int = 0):
        """Send ``send`` to the next rank of ``group`` and receive ``recv`` from the previous one, in one
        ``batch_isend_irecv``. Returns the requests; wait on them before reading ``recv``."""
        size = dist.get_world_size(group)
        me = dist.get_rank(group)
        nxt = dist.get_global_rank(group, (me + 1) % size)
        prv = dist.get_global_rank(group, (me - 1) % size)
        ops = [dist.P2POp(dist.isend, t, nxt, group=group, tag=tag) for t in send]
        ops += [dist.P2POp(dist.irecv, t, prv, group=group, tag=tag) for t in recv]
        self.counts["p2p_batch"] += 1
        self.bytes["p2p_batch"] += sum(t.numel() * t.element_size() for t in send)
        return dist.batch_isend_irecv(ops)

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, *, group: dist.ProcessGroup) -> None:
        """Equal-split all-to-all along dim 0."""
        self.counts["all_to_all"] += 1
        self.bytes["all_to_all"] += inp.numel() * inp.element_size()
        dist.all_to_all_single(out, inp, group=group)
