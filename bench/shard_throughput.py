"""Images per second per worker for data_tools.shard on real-size JPEGs, and what that gives for
ImageNet (1,281,167 images) on 1 and on 8 machines (issue 41, section 2).

    python bench/shard_throughput.py [--n 300] [--size 500x375] [--resize 256] [--workers 1,2]

Makes --n JPEGs of --size (smooth gradients plus noise, quality 90: about the bytes per pixel of a
photograph), shards them with the tool's own make_shards (decode, resize the shorter side to
--resize, centre crop, JPEG encode, tar, write) once per worker count, and prints a table. The
estimate scales the best per-worker rate to 16 workers per machine and assumes the parts of
`--part I/N` run independently (they share nothing but the listing), with storage not the limit.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_tools.shard import make_shards, shuffle_items  # noqa: E402

IMAGENET = 1_281_167


def make_jpegs(folder: str, n: int, w: int, h: int) -> list[str]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(-1, 1, 3)
        base = np.stack([128 + 100 * np.sin(a * x / 40 + b * y / 60 + k + c * 3) for k in range(3)], -1)
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        d = os.path.join(folder, f"c{i % 10}")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"{i:05d}.jpg")
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--size", default="500x375")
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--workers", default="1,2", help="worker counts to time, comma-separated")
    p.add_argument("--shard-size", type=int, default=1000)
    args = p.parse_args(argv)
    w, h = map(int, args.size.split("x"))
    tmp = tempfile.mkdtemp(prefix="shard_bench_")
    try:
        src = os.path.join(tmp, "src")
        paths = make_jpegs(src, args.n, w, h)
        mean_kb = np.mean([os.path.getsize(q) for q in paths]) / 1e3
        classes = sorted({os.path.basename(os.path.dirname(q)) for q in paths})
        items = shuffle_items([(q, None, classes.index(os.path.basename(os.path.dirname(q)))) for q in paths], True)
        opts = {"kind": "image", "shard_size": args.shard_size, "shard_bytes": 0, "resize": args.resize,
                "format": None, "clip_frames": 0, "frame_stride": 1, "shuffle": True, "source": src}
        print(f"data_tools.shard on {args.n} JPEGs of {w}x{h} ({mean_kb:.0f} kB each), --resize {args.resize}; "
              f"CPU: {cpu_name()} ({os.cpu_count()} cores)")
        print(f"{'workers':>7} {'seconds':>8} {'images/s':>9} {'per worker':>11}")
        rates = []
        for k in [int(x) for x in args.workers.split(",")]:
            out = os.path.join(tmp, f"out{k}")
            t = time.perf_counter()
            man = make_shards(items, out, opts, classes, workers=k, progress=False)
            dt = time.perf_counter() - t
            assert man["total"] == args.n, man["errors"][:3]
            rates.append(args.n / dt / k)
            print(f"{k:>7} {dt:>8.2f} {args.n / dt:>9.1f} {args.n / dt / k:>11.1f}")
        best = max(rates)
        print(f"\nImageNet ({IMAGENET:,} images) at {best:.1f} images/s per worker, 16 workers per machine:")
        print(f"{'machines':>8} {'workers':>8} {'images/s':>9} {'minutes':>8}")
        for m in (1, 8):
            r = best * 16 * m
            print(f"{m:>8} {16 * m:>8} {r:>9.0f} {IMAGENET / r / 60:>8.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
