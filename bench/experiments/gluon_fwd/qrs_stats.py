"""ptxas stats of the Gluon forward for each Q_RS (0: Q read from shared memory by every S = Q K^T, 1: Q in registers,
2: in the run of bench/results/gluon_fwd_qrs_stats_triton36_2026-12-04.json, Q in registers and the masked tiles'
column indices kept from being hoisted out of the K/V loop, a variant since removed), with the Triton this machine
has: PYTHONPATH=. python bench/experiments/gluon_fwd/qrs_stats.py  ($OUT/gluon_fwd_qrs_stats.json)"""
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
OUT = os.environ.get("OUT", ".")
rows = {}
for q in (0, 1):
    code = ("import sys, runpy; import longreach.kernels.flash.gluon_sm90 as g; g.Q_RS = %d; "
            "sys.argv = ['kernel_stats.py', '--gluon', '--json', '%s/qrs%d.json']; "
            "runpy.run_path('%s/scripts/kernel_stats.py', run_name='__main__')" % (q, OUT, q, ROOT))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    print(f"Q_RS={q}", r.stdout[-2000:], r.stderr[-500:] if r.returncode else "")
    if r.returncode == 0:
        rows[q] = [{k: v for k, v in x.items() if k != "sass"} for x in json.load(open(f"{OUT}/qrs{q}.json"))
                   if not x["variant"].startswith("bwd")]
        os.remove(f"{OUT}/qrs{q}.json")
json.dump(rows, open(f"{OUT}/gluon_fwd_qrs_stats.json", "w"), indent=1)
