"""The eval ledger: one row per scored snapshot and metric, read as one list by the service and
launch.status.

A local run appends lines to RUN/eval/ledger.jsonl (O_APPEND: concurrent services interleave whole
lines). A bucket cannot append, and rewriting the whole file to add a row lets two services drop
each other's rows, so there each row is its own object, RUN/eval/ledger/STEP-METRIC-OWNER.json.
"""
from __future__ import annotations

import json
from typing import Optional

from rin_scale import rundir, storage

PRIMARY = ("fid", "fvd")  # the metric a snapshot is scored for; class_accuracy rides along


def jsonl_url(run: str) -> str:
    return storage.join(run, "eval", "ledger.jsonl")


def append(run: str, row: dict, owner: str) -> None:
    if storage.is_local(run):
        storage.append_jsonl(jsonl_url(run), row)
    else:
        name = f"{rundir.step_name(row['step'])}-{row['metric']}-{owner}.json"
        storage.write_json(storage.join(run, "eval", "ledger", name), row)


def read(run: str, cache: Optional[dict] = None) -> list[dict]:
    """Every row, oldest step first. Row objects never change, so a `cache` dict kept by a
    long-running reader saves fetching them again."""
    cache = {} if cache is None else cache
    fs, root = storage.fs_path(storage.join(run, "eval", "ledger"))
    try:
        names = [p for p in fs.ls(root, detail=False, refresh=True) if p.endswith(".json")]
    except FileNotFoundError:
        names = []
    new = [p for p in names if p not in cache]
    if new:
        cache.update((p, json.loads(b)) for p, b in fs.cat(new, on_error="omit").items())
    rows = storage.read_jsonl(jsonl_url(run)) + [cache[p] for p in names if p in cache]
    return sorted(rows, key=lambda r: (r.get("step", -1), r.get("time", 0)))


def newest(rows: list[dict]) -> Optional[dict]:
    """The newest step's row for its primary metric (any row when there is none)."""
    main = [r for r in rows if r.get("metric") in PRIMARY] or rows
    return max(main, key=lambda r: (r.get("step", -1), r.get("time", 0)), default=None)
