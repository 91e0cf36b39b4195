"""Batches mix classes from the first epoch, for data laid out one class per folder or per shard
(bench/data_mixing.py on real tar shards, with forked DataLoader workers)."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench():
    spec = importlib.util.spec_from_file_location("data_mixing", os.path.join(ROOT, "bench", "data_mixing.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("case", ["tool", "pre-sorted"])
def test_batches_hold_as_many_classes_as_independent_draws(tmp_path_factory, case):
    # 10 classes x 40 images, one class per shard when sorted; 2 ranks x 16, data.workers=2, default flags
    rows = _rows(tmp_path_factory)
    row = next(r for r in rows if r["case"] == case)
    assert row["batches"] == 2 * 12
    assert row["ratio"] >= 0.9, row  # before the fix: about 2 classes per batch of 16, where 8.1 are expected


_cache = {}


def _rows(tmp_path_factory):
    if not _cache:
        root = str(tmp_path_factory.mktemp("mixing"))
        _cache["rows"] = bench().measure(root, classes=10, images=40, shard_size=40, world=2, batch=16, workers=2)
    return _cache["rows"]
