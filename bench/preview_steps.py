"""How few DDIM steps the trainer's preview grid (train.sample_steps) can take and still show what
the model does: a snapshot's samples from fixed noise at k DDIM steps in bf16 autocast (where the
CPU has native bf16) against the same noise at --ref DDIM steps in fp32, and the seconds each took.

    .venv/bin/python bench/preview_steps.py SNAPSHOT_OR_RUN [--count 16] [--ref 250] [--steps 10 25 50 100]

Prints a table: steps, seconds, RMS difference to the reference (images in [-1, 1]) and the
fraction of pixels off by more than 0.1 (a visible change).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main():
    from rin_scale import rundir
    from rin_scale.diffusion import sample
    from rin_scale.perf import native_cpu_bf16
    from rin_scale.sample import resolve_snapshot

    p = argparse.ArgumentParser()
    p.add_argument("source")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--ref", type=int, default=250)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100])
    a = p.parse_args()
    model, dcfg, meta = rundir.load_snapshot_model(resolve_snapshot(a.source)[0])
    m = model.cfg
    noise = torch.randn((a.count, *m.sample_shape), generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(a.count) % m.num_classes if m.num_classes else None

    def run(steps, bf16):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx, torch.no_grad():
            x = sample(model, noise.shape, dcfg, labels=labels, noise=noise, steps=steps, sampler="ddim",
                       generator=torch.Generator().manual_seed(0))
        return x.float(), time.perf_counter() - t0

    ref, ref_s = run(a.ref, False)
    bf16 = bool(native_cpu_bf16())
    print(f"snapshot step {meta['step']}, {a.count} samples; reference: {a.ref} DDIM steps fp32 ({ref_s:.1f} s)")
    print(f"| DDIM steps ({'bf16' if bf16 else 'fp32'}) | seconds | RMS difference | pixels off > 0.1 |")
    print("| --- | --- | --- | --- |")
    for k in a.steps:
        x, s = run(k, bf16)
        d = x - ref
        print(f"| {k} | {s:.2f} | {d.pow(2).mean().sqrt():.4f} | {(d.abs() > 0.1).float().mean():.1%} |")


if __name__ == "__main__":
    main()
