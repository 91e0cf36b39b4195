"""The kill drill of bench/faults.py, run by CI: kill -9 of the whole job (torchrun launcher and
every rank's group) at save phases and at a random moment, re-running the same command after each,
with ZeRO-2 on 2 ranks x 2 data workers and precision auto; every step's loss and every EMA
snapshot must equal the uninterrupted run's. (Outages, the lease and the eval service have their
own tests in test_storage, test_lease and test_evals_service; the whole drill set is
`bench/faults.py`, README "Reliability".)
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kill_drill_resumes_bit_identically(tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "faults.py"), "--quick", "--only", "kills",
                           "--seed", "7", "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert proc.returncode == 0 and report["ok"], proc.stdout[-4000:] + proc.stderr[-4000:]
    kills = report["summary"]["kills"]
    exact, of = (int(v) for v in kills["exact resumes"].split(" of "))
    assert kills["kills"] >= 2 and exact == of == kills["kills"], kills
    chains = [t for t in report["trials"] if t.get("trial", "").endswith(" end")]
    assert chains and all(t["ok"] for t in chains), report["trials"]
