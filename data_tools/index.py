"""Write the sample index (NAME.tar.idx) of shards that lack one.

    python -m data_tools.index URL [--force] [--workers 8]

URL: a shard folder, manifest or brace pattern, as data.shards takes it. Each tar without an index
(every tar with --force) is walked once, by its headers, and NAME.tar.idx is written beside it: the
byte offset of each sample, then the end of the last, as int64 little-endian (rin_scale.shards). With
it the loader reads a worker's samples with ranged reads instead of reading each shard from its
start; data_tools.shard writes it with every shard. An index whose sample count differs from the
manifest's is not written (the shard is named instead).
"""
from __future__ import annotations

import argparse
import io
import sys
from concurrent.futures import ThreadPoolExecutor

from rin_scale.shards import DataError, index_bytes, index_url, list_shards, parse_index, tar_offsets
from rin_scale.storage import exists, open_read, read_bytes, retry, write_bytes


def write_shard(url: str, data: bytes) -> None:
    """A shard's tar and its index: the index first and the tar last (atomic), so that a shard
    exists when its tar does, as before."""
    write_bytes(index_url(url), index_bytes(tar_offsets(io.BytesIO(data))))
    write_bytes(url, data)


def index_shard(url: str, count: int | None = None, force: bool = False) -> str:
    """Writes url's index unless one that fits is there; returns "wrote" or "had one"."""
    if not force and exists(index_url(url)) and parse_index(read_bytes(index_url(url)), count) is not None:
        return "had one"
    def walk():
        with open_read(url) as f:
            return tar_offsets(f)

    off = retry(walk, f"reading {url}")
    if count is not None and len(off) != count + 1:
        raise DataError(f"{url} holds {len(off) - 1} samples but its manifest says {count}: re-shard it")
    write_bytes(index_url(url), index_bytes(off))
    return "wrote"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("url", help="shard folder, manifest or brace pattern")
    ap.add_argument("--force", action="store_true", help="rewrite indexes that exist")
    ap.add_argument("--workers", type=int, default=8, help="shards indexed at once (default 8)")
    args = ap.parse_args(argv)
    try:
        shards, counts, _ = list_shards(args.url)
        with ThreadPoolExecutor(max(1, args.workers)) as pool:
            done = list(pool.map(lambda sc: index_shard(sc[0], sc[1], args.force), zip(shards, counts)))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    wrote = done.count("wrote")
    print(f"indexed {wrote} of {len(shards)} shards at {args.url}"
          + (f" ({len(shards) - wrote} had an index)" if wrote < len(shards) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
