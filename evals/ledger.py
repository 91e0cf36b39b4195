"""The eval ledger: one row per scored snapshot and metric, read as one list by the service and
launch.status (rin_scale.rundir reads and writes it: RUN/eval/ledger.jsonl locally, one object per
row in a bucket)."""
from __future__ import annotations

from typing import Optional

from rin_scale import rundir

PRIMARY = ("fid", "fvd")  # the metric a snapshot is scored for; class_accuracy rides along

# The ledger's reading and writing live in rin_scale.rundir: the trainer writes `skipped` rows too.
append, read, jsonl_url = rundir.append_ledger, rundir.read_ledger, rundir.ledger_jsonl_url


def newest(rows: list[dict]) -> Optional[dict]:
    """The newest step's row for its primary metric (any row when there is none)."""
    main = [r for r in rows if r.get("metric") in PRIMARY] or rows
    return max(main, key=lambda r: (r.get("step", -1), r.get("time", 0)), default=None)
