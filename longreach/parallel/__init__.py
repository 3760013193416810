"""Context parallelism: one sequence split over several ranks.

mesh.py      ``build_mesh`` -> ``Mesh`` (dp x ring x ulysses process groups), ``validate_parallel``
plan.py      ``ShardPlan`` (zigzag layout, padding, shard/unshard), ``CPAttnInfo``, ``make_shard_fn``, ``rank_loss``
local.py     ``local_attention`` / ``local_attention_backward``: the (out, lse) block function with causal+doc masks
merge.py     ``merge_``: the fp32 (out, lse) merge
ring.py      zigzag ring attention (autograd Function with its own dK/dV ring)
ulysses.py   sequence<->heads all-to-all, KV head replication, head-count checks
hybrid.py    ``cp_attention``: Ulysses inside sub-groups x ring across them (ring / Ulysses are its special cases)
attention.py registry entries 'ring', 'ulysses', 'hybrid'
comm_count.py ``Comm``: the counted collectives every strategy goes through
setup.py     ``cp_model_config`` / ``setup_parallel``: parallel.* checked and turned into the trainer's groups and shard_fn
"""
