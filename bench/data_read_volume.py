"""Bytes and requests one epoch fetches from a bucket, with and without the shards' sample index.

    .venv/bin/python bench/data_read_volume.py [--ranks 64] [--workers 2] [--batch 8] [--shards 32]
                                              [--samples 200] [--sample-kb 20] [--window 4]

Shards of random samples are written to a real GCS API server (fake-gcs-server on 127.0.0.1, as
in the tests) with their .idx files; a second copy without them. Then one epoch of a larger
world is read in this process: every (rank, DataLoader worker) reader that the loader would make
(rin_scale.data._EpochStream without DeepSpeed or worker processes), each with its own index
cache, reads its samples exactly as a worker does. Every HTTP request gcsfs makes is counted
(GCSFileSystem._request), with the bytes of its answer: bytes fetched / dataset bytes, and requests,
for the indexed shards and the plain ones.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import rin_scale.storage  # noqa: E402,F401 - its gcsfs settings precede the gcsfs import

import numpy as np  # noqa: E402


class Counter:
    """Every GCS API call of this process: requests and bytes received, by kind of object."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.requests, self.bytes = {}, {}

    def add(self, kind: str, n: int):
        self.requests[kind] = self.requests.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + n


COUNT = Counter()


def count_gcs_calls():
    import gcsfs

    orig = gcsfs.GCSFileSystem._request

    @functools.wraps(orig)
    async def _request(self, method, path, *args, **kwargs):
        status, headers, info, out = await orig(self, method, path, *args, **kwargs)
        p = " ".join(map(str, (path, *args)))
        kind = "idx" if ".idx" in p else "tar" if ".tar" in p else "other"
        COUNT.add(kind, len(out) if isinstance(out, (bytes, bytearray)) else 0)
        return status, headers, info, out

    gcsfs.GCSFileSystem._request = _request


def write_dataset(url: str, n_shards: int, per_shard: int, sample_kb: int, index: bool, seed: int = 0) -> int:
    """Shards of random 'jpg' members (never decoded here) and a manifest; returns the tar bytes."""
    import json

    from data_tools.index import write_shard
    from rin_scale.shards import tar_bytes
    from rin_scale.storage import join, write_bytes

    rng = np.random.default_rng(seed)
    shards, total = [], 0
    for s in range(n_shards):
        samples = [{"__key__": f"{s:04d}_{i:05d}", "cls": b"%d" % (i % 10),
                    "jpg": rng.bytes(int(sample_kb * 1024 * rng.uniform(0.5, 1.5)))} for i in range(per_shard)]
        data = tar_bytes(samples)
        name = f"data-{s:06d}.tar"
        (write_shard if index else write_bytes)(join(url, name), data)
        shards.append({"name": name, "samples": per_shard, "bytes": len(data)})
        total += len(data)
    man = {"shards": shards, "total": n_shards * per_shard, "classes": [str(i) for i in range(10)],
           "kind": "image", "options": {"shuffle": True}}
    write_bytes(join(url, "data-manifest.json"), json.dumps(man).encode())
    return total


def read_epoch(url: str, ranks: int, workers: int, batch: int, window: int):
    """(samples read, unreadable) over every rank's every worker for epoch 0."""
    from rin_scale.config import load_config
    from rin_scale.data import EpochOrder, _EpochStream, epoch_batches, positions, shards_indexed
    from rin_scale.shards import list_shards

    cfg = load_config("tiny", [f"data.shards={url}", f"data.interleave={window}", "data.shuffle_buffer=100"])
    shards, counts, _ = list_shards(url)
    total = sum(counts)
    nb = epoch_batches(total, batch, ranks, batch * ranks)
    indexed = shards_indexed(shards, url, say=False)
    order = EpochOrder(counts, cfg.data.seed, 0, window, cfg.data.shuffle_buffer)
    n = bad = 0
    for rank in range(ranks):
        for wid in range(workers):
            ds = _EpochStream(shards, counts, cfg.data, cfg.model, batch, rank, ranks, 0, 0, nb, window)
            ds.indexed = indexed  # a fresh reader per worker: its own index cache, as in a worker process
            mine = range(wid, nb, workers)  # what _EpochStream.__iter__ gives worker wid of `workers`
            if not len(mine):
                continue
            pos = np.concatenate([positions(rank, ranks, batch, j) for j in mine])
            for _, sample in ds._samples(order, pos):
                n += 1
                bad += sample is None
    return n, bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--samples", type=int, default=200, help="samples per shard")
    ap.add_argument("--sample-kb", type=float, default=20, help="mean sample size (uniform 0.5x..1.5x)")
    ap.add_argument("--window", type=int, default=4, help="data.interleave (4: the shard tool's shuffled shards)")
    args = ap.parse_args(argv)

    import gcsfs
    from conftest import free_port, start_fake_gcs

    port = free_port()
    proc = start_fake_gcs(port, "-backend", "memory")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        gcsfs.GCSFileSystem(endpoint_url=os.environ["STORAGE_EMULATOR_HOST"], token="anon").mkdir("bench")
        size = write_dataset("gs://bench/indexed", args.shards, args.samples, args.sample_kb, index=True)
        write_dataset("gs://bench/plain", args.shards, args.samples, args.sample_kb, index=False)
        count_gcs_calls()
        print(f"{args.shards} shards x {args.samples} samples of ~{args.sample_kb:g} KB = {size / 1e6:.1f} MB "
              f"({size / args.shards / 1e6:.2f} MB a shard); {args.ranks} ranks x {args.workers} workers, "
              f"batch {args.batch}, window {args.window}; one epoch, gcsfs {gcsfs.__version__} on fake-gcs-server")
        print(f"{'shards':<10}{'samples':>9}{'errors':>8}{'tar MB':>10}{'idx MB':>9}{'fetched/data':>14}"
              f"{'requests':>10}{'req/sample':>12}{'seconds':>9}")
        for name in ("plain", "indexed"):
            COUNT.reset()
            t = time.perf_counter()
            n, bad = read_epoch(f"gs://bench/{name}", args.ranks, args.workers, args.batch, args.window)
            dt = time.perf_counter() - t
            got = sum(COUNT.bytes.values())
            req = sum(COUNT.requests.values())
            print(f"{name:<10}{n:>9}{bad:>8}{COUNT.bytes.get('tar', 0) / 1e6:>10.1f}"
                  f"{COUNT.bytes.get('idx', 0) / 1e6:>9.2f}{got / size:>13.2f}x{req:>10}{req / max(n, 1):>12.2f}"
                  f"{dt:>9.1f}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
