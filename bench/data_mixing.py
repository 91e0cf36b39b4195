"""Distinct classes per batch against independent draws, for data laid out one class per folder.

    python bench/data_mixing.py [--classes 20] [--images 60] [--shard-size 60] [--world 4] [--batch 32]
                                [--buffers 1000] [--workers 2]

Two cases, each read for one epoch by every rank with the loader's default flags:
  tool:       a class-sorted folder (K class folders of M images) sharded by data_tools.shard, defaults
  pre-sorted: shards written in sorted order, one class per shard when shard size = M (as other
              tools, or data_tools.shard before it shuffled, leave them)
For each: the mean (and the lowest) number of distinct classes in a rank's batch, over every batch
of the epoch, against the expectation for independent draws K * (1 - (1 - 1/K)^B). The target is a
ratio of at least 0.9.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_tools.shard import main as shard_main, make_shards  # noqa: E402
from rin_scale.config import load_config  # noqa: E402
from rin_scale.data import ShardLoader  # noqa: E402


def iid_expectation(k: int, b: int) -> float:
    return k * (1 - (1 - 1 / k) ** b)


def sorted_folder(root: str, classes: int, images: int) -> None:
    """K class folders c000.. of M small PNGs each (a flat colour per class, some noise)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = os.path.join(root, f"c{c:03d}")
        os.makedirs(d, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        for i in range(images):
            arr = np.clip(colour + rng.integers(-20, 21, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(d, f"{i:05d}.png"))


def shard_with_tool(src: str, out: str, shard_size: int) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        rc = shard_main([src, out, "--shard-size", str(shard_size), "--workers", "1", "--quiet"])
    assert rc == 0, "data_tools.shard failed"


def shard_sorted(src: str, out: str, shard_size: int, classes: int) -> None:
    """The folder in sorted path order, as the shard tool wrote it before it shuffled."""
    names = sorted(os.listdir(src))
    items = [(os.path.join(src, c, f), None, k) for k, c in enumerate(names) for f in sorted(os.listdir(os.path.join(src, c)))]
    opts = {"kind": "image", "shard_size": shard_size, "shard_bytes": 0, "resize": 0, "format": None,
            "clip_frames": 0, "frame_stride": 1, "source": src}
    make_shards(items, out, opts, names, workers=1, progress=False)


def distinct_per_batch(shards: str, classes: int, world: int, batch: int, workers: int, buffer=None) -> list[int]:
    """Distinct labels in every rank batch of the first epoch, over all ranks."""
    over = [f"data.shards={shards}", f"data.workers={workers}", f"model.num_classes={classes}"]
    if buffer is not None:
        over.append(f"data.shuffle_buffer={buffer}")
    cfg = load_config("tiny", over)
    out = []
    for rank in range(world):
        loader = ShardLoader(cfg.data, cfg.model, batch, rank, world)
        it = iter(loader)
        for _ in range(loader.batches_per_epoch):
            out.append(len(set(next(it)["label"].tolist())))
    return out


def measure(root: str, classes: int, images: int, shard_size: int, world: int, batch: int, workers: int,
            buffers=(None,)) -> list[dict]:
    src, tool, pre = (os.path.join(root, n) for n in ("src", "tool", "sorted"))
    sorted_folder(src, classes, images)
    shard_with_tool(src, tool, shard_size)
    shard_sorted(src, pre, shard_size, classes)
    exp = iid_expectation(classes, batch)
    rows = []
    for case, url in (("tool", tool), ("pre-sorted", pre)):
        for buf in buffers:
            d = distinct_per_batch(url, classes, world, batch, workers, buf)
            rows.append({"case": case, "buffer": "default" if buf is None else buf, "mean": float(np.mean(d)),
                         "min": int(min(d)), "batches": len(d), "iid": exp, "ratio": float(np.mean(d)) / exp})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=20, help="K classes (folders)")
    p.add_argument("--images", type=int, default=60, help="M images per class")
    p.add_argument("--shard-size", type=int, default=60)
    p.add_argument("--world", type=int, default=4, help="ranks")
    p.add_argument("--batch", type=int, default=32, help="batch per rank")
    p.add_argument("--workers", type=int, default=2, help="data.workers")
    p.add_argument("--buffers", default="", help="comma-separated data.shuffle_buffer values (default: the config's)")
    a = p.parse_args(argv)
    buffers = [int(b) for b in a.buffers.split(",") if b] or [None]
    with tempfile.TemporaryDirectory() as root:
        rows = measure(root, a.classes, a.images, a.shard_size, a.world, a.batch, a.workers, buffers)
    print(f"{a.classes} classes x {a.images} images, shard size {a.shard_size}, {a.world} ranks x batch {a.batch}, "
          f"data.workers={a.workers}; first epoch")
    print(f"| case | shuffle_buffer | distinct classes / batch (mean) | lowest | i.i.d. expectation | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['buffer']} | {r['mean']:.1f} | {r['min']} | {r['iid']:.1f} | {r['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
