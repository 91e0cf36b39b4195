"""Peak resident memory of `rin_scale.sample --npz` against the sample count: flat when it streams.

    python bench/export_memory.py [--counts 2000,20000] [--size 64] [--steps 1]

Writes a snapshot of a fresh tiny-preset RIN at SIZE x SIZE (the weights do not change the cost),
exports COUNT samples per run in a child process, and prints a markdown table of the child's peak
RSS (getrusage) and the .npz size.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_snapshot(run: str, size: int) -> str:
    import torch

    from rin_scale import rundir
    from rin_scale.config import load_config
    from rin_scale.model import RIN

    cfg = load_config("tiny", [f"train.run_dir={run}", f"model.image_size={size}"])
    torch.manual_seed(0)
    return rundir.write_snapshot(run, 1, RIN(cfg.model).state_dict(), cfg, {"images_seen": 0})


def export(snap: str, out: str, n: int, steps: int, chunk: int) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one export, in a fresh child whose own child is the export (so
    each figure is that export's alone: RUSAGE_CHILDREN keeps the largest child seen)."""
    cmd = [sys.executable, "-m", "rin_scale.sample", snap, "--n", str(n), "--steps", str(steps), "--batch", "250",
           "--chunk", str(chunk), "--npz", out, "--out", out + ".png"]
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stderr=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    t = time.time()
    kb = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                        check=True, capture_output=True, text=True).stdout.split()[-1]
    return time.time() - t, int(kb) / 1e6


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="2000,20000")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--chunk", type=int, default=1000)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        snap = make_snapshot(f"{tmp}/run", args.size)
        for n in map(int, args.counts.split(",")):  # ascending: each peak is then this run's own
            out = f"{tmp}/samples-{n}.npz"
            sec, gb = export(snap, out, n, args.steps, args.chunk)
            rows.append((n, gb, os.path.getsize(out) / 1e6, sec))
            os.remove(out)
    print(f"{args.size}x{args.size}, tiny preset, {args.steps} sampling step(s), --chunk {args.chunk}\n")
    print("| samples | peak RSS | .npz | seconds |\n|---|---|---|---|")
    for n, gb, mb, sec in rows:
        print(f"| {n:,} | {gb:.2f} GB | {mb:.0f} MB | {sec:.0f} |")


if __name__ == "__main__":
    main()
