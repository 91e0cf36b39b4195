"""The per-shard sample index (NAME.tar.idx) and the loader's ranged reads of it."""
import io
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from data_tools.embedded import digits
from data_tools.index import main as index_main
from data_tools.index import write_shard
from data_tools.shard import make_shards
from rin_scale import storage
from rin_scale.config import load_config
from rin_scale.data import EpochOrder, ShardLoader, positions
from rin_scale.shards import (index_url, list_shards, parse_index, read_tar_samples, sample_from_bytes, tar_bytes,
                              tar_offsets)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """The 360 held-out digits in 4 local shards of 90, as data_tools.shard writes them (with indexes)."""
    out = str(tmp_path_factory.mktemp("indexed"))
    items = [(f"embedded:{n}", a, y) for n, a, y in digits("heldout")]
    opts = {"kind": "image", "shard_size": 90, "shard_bytes": 0, "resize": 0, "format": None,
            "clip_frames": 0, "frame_stride": 1, "source": "test"}
    make_shards(items, out, opts, [str(i) for i in range(10)], workers=1, progress=False)
    return out


def plain_copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.idx"))
    return str(dst)


def cfg_for(url, workers=2, *more):
    return load_config("tiny", [f"data.shards={url}", f"data.workers={workers}", "data.shuffle_buffer=50", *more])


def batches(url, batch, rank, world, n=None, state=None, workers=2):
    cfg = cfg_for(url, workers)
    loader = ShardLoader(cfg.data, cfg.model, batch, rank, world, state=state)
    it = iter(loader)
    out = [next(it) for _ in range(loader.batches_per_epoch if n is None else n)]
    return loader, out


def test_the_index_matches_the_tar(indexed):
    shards, counts, _ = list_shards(indexed)
    for url, n in zip(shards, counts):
        data = open(url, "rb").read()
        off = parse_index(open(index_url(url), "rb").read(), n)
        assert off is not None and len(off) == n + 1 and off[-1] <= len(data)
        assert off == tar_offsets(io.BytesIO(data))
        ref = [s for _, s in read_tar_samples(url)]
        assert [sample_from_bytes(data[off[i]:off[i + 1]]) for i in range(n)] == ref
    assert parse_index(open(index_url(shards[0]), "rb").read(), counts[0] + 1) is None  # another count
    assert parse_index(b"\0" * 12) is None  # torn


def test_batches_are_the_same_with_and_without_the_index(indexed, tmp_path, capfd):
    plain = plain_copy(indexed, tmp_path / "plain")
    for rank in range(2):
        _, a = batches(indexed, 12, rank, 2)
        _, b = batches(plain, 12, rank, 2)
        assert len(a) == len(b) == 15
        for x, y in zip(a, b):
            assert x["key"] == y["key"] and torch.equal(x["x"], y["x"]) and torch.equal(x["label"], y["label"])
    assert "python -m data_tools.index" in capfd.readouterr().err  # said once at start-up, for the plain shards
    # a resume mid-epoch, on the other kind of shards, continues the same stream
    loader, first = batches(indexed, 12, 0, 2, n=6)
    _, rest = batches(plain, 12, 0, 2, n=loader.batches_per_epoch - 6, state=loader.state_dict())
    _, whole = batches(indexed, 12, 0, 2)
    assert [b["key"] for b in first + rest] == [b["key"] for b in whole]
    assert all(torch.equal(x["x"], y["x"]) for x, y in zip(first + rest, whole))


class Reads:
    """Every storage.read_bytes / read_range / open_read of this process: (url, bytes)."""

    def __init__(self, monkeypatch):
        self.log = []
        for name in ("read_bytes", "read_range"):
            orig = getattr(storage, name)

            def counted(*a, _orig=orig, **k):
                out = _orig(*a, **k)
                self.log.append((a[0], len(out)))
                return out
            monkeypatch.setattr(f"rin_scale.data.{name}", counted)

        self.streamed = []
        orig_open = storage.open_read

        def streamed(url):
            self.streamed.append(url)
            return orig_open(url)
        monkeypatch.setattr("rin_scale.shards.open_read", streamed)


def test_a_worker_fetches_only_its_samples_and_their_indexes(indexed, monkeypatch):
    shards, counts, _ = list_shards(indexed)
    cfg = cfg_for(indexed, workers=0)
    reads = Reads(monkeypatch)
    world, rank, batch = 4, 1, 6
    loader = ShardLoader(cfg.data, cfg.model, batch, rank, world)
    it = iter(loader)
    got = [next(it) for _ in range(loader.batches_per_epoch)]
    # the samples this rank reads, and their spans by the index
    order = EpochOrder(counts, cfg.data.seed, 0, loader.width, cfg.data.shuffle_buffer)
    pos = np.concatenate([positions(rank, world, batch, j) for j in range(loader.batches_per_epoch)])
    offs = {s: parse_index(open(index_url(u), "rb").read()) for s, u in enumerate(shards)}
    spans, visited = 0, set()
    for p in pos:
        k = order.window_of(int(p))
        s, m = (int(v[int(p) - order.starts[k]]) for v in order.window(k))
        spans += offs[s][m + 1] - offs[s][m]
        visited.add(s)
    tar_bytes_read = sum(n for u, n in reads.log if u.endswith(".tar"))
    idx_bytes_read = sum(n for u, n in reads.log if u.endswith(".idx"))
    assert tar_bytes_read == spans  # exactly the wanted samples' spans
    assert idx_bytes_read == sum(os.path.getsize(index_url(shards[s])) for s in visited)  # each index once
    assert sum(len(b["key"]) for b in got) == len(pos) and loader.stats["errors"] == 0
    assert reads.streamed == []  # no shard read front to back


def test_a_corrupt_sample_in_an_indexed_shard_costs_that_sample_only(indexed, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(indexed, bad)
    url = str(bad / "data-000001.tar")
    data = bytearray(open(url, "rb").read())
    off = parse_index(open(index_url(url), "rb").read())
    data[off[7] + 100] ^= 0xFF  # the header checksum of sample 7's first member: unreadable by tarfile
    open(url, "wb").write(bytes(data))
    ref = [s["__key__"] for _, s in read_tar_samples(str(indexed + "/data-000001.tar"))]
    cfg = cfg_for(str(bad), 2, "data.max_error_rate=0.5")
    keys, errors = [], 0
    for rank in range(2):
        loader = ShardLoader(cfg.data, cfg.model, 12, rank, 2)
        it = iter(loader)
        keys += sum((next(it)["key"] for _ in range(loader.batches_per_epoch)), [])
        errors += loader.stats["errors"]
    assert errors == 1 and ref[7] not in keys
    assert set(ref) - set(keys) == {ref[7]}  # the rest of that shard still arrives


def test_index_tool_adds_indexes_to_shards_without(indexed, tmp_path, capsys):
    plain = plain_copy(indexed, tmp_path / "plain")
    assert not [f for f in os.listdir(plain) if f.endswith(".idx")]
    assert index_main([plain]) == 0
    assert "indexed 4 of 4 shards" in capsys.readouterr().out
    for f in sorted(os.listdir(indexed)):
        if f.endswith(".idx"):
            assert open(os.path.join(plain, f), "rb").read() == open(os.path.join(indexed, f), "rb").read()
    out = capsys.readouterr().out if index_main([plain]) == 0 else ""
    assert out.startswith("indexed 0 of 4 shards") and "(4 had an index)" in out


def test_write_shard_writes_the_index_before_the_tar(tmp_path, monkeypatch):
    order = []
    orig = storage.write_bytes
    monkeypatch.setattr("data_tools.index.write_bytes", lambda u, d: (order.append(u), orig(u, d)))
    samples = [{"__key__": f"k{i}", "jpg": b"x" * (600 * i + 1), "cls": b"1"} for i in range(5)]
    url = str(tmp_path / "a.tar")
    write_shard(url, tar_bytes(samples))
    assert order == [url + ".idx", url]
    off = parse_index(open(url + ".idx", "rb").read(), 5)
    data = open(url, "rb").read()
    assert [sample_from_bytes(data[off[i]:off[i + 1]]) for i in range(5)] == samples
    with pytest.raises(tarfile.TarError):
        sample_from_bytes(data[off[1]:off[3]])  # two samples where the index has one
