"""ZeRO-2 gradient communication on 2 gloo ranks: step time by bucket size, with and without
overlap_comm, and the error of reducing gradients in bf16 (train.reduce_bf16) against fp32.

    .venv/bin/python bench/comm_buckets.py [--preset cifar10] [--micro 4] [--steps 6] [--rounds 2]

Starts itself under torchrun (2 ranks, one thread each). Every setting is a fresh DeepSpeed engine
(the trainer's: rin_scale.engine.build_engine, the preset's LAMB) over the same model and the same
synthetic batches; the settings are timed in rounds that interleave them (medians), since a shared
machine's load drifts. Prints one table (rank 0): median step seconds per setting and each
setting's ratio to DeepSpeed's defaults (no overlap, 500M-element buckets). Then the bf16
reduction: one backward of the same batch in bf16 autocast, the full reduced gradient
(deepspeed.utils.safe_get_full_grad) with Linear/Conv gradients reduced in bf16 against fp32:
the relative error ||g_bf16 - g_fp32|| / ||g_fp32|| over all parameters, and the largest per tensor.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (label, overlap_comm, bucket MB); None: DeepSpeed's defaults (500M elements = 2,000 MB, no overlap)
SETTINGS = [("deepspeed default", None, None), ("no overlap, 50 MB", False, 50.0), ("overlap, 5 MB", True, 5.0),
            ("overlap, 25 MB", True, 25.0), ("overlap, 50 MB", True, 50.0), ("overlap, 200 MB", True, 200.0)]


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--micro", type=int, default=4, help="micro-batch per rank")
    p.add_argument("--steps", type=int, default=6, help="timed steps per setting and round")
    p.add_argument("--rounds", type=int, default=2)
    return p.parse_args()


def build(cfg, overlap, mb, precision):
    import torch

    from rin_scale.engine import build_engine, device
    from rin_scale.model import RIN

    torch.manual_seed(0)
    if overlap is not None:
        cfg.train.overlap_comm, cfg.train.comm_bucket_mb = overlap, mb
    engine, _, _ = build_engine(RIN(cfg.model).to(device()), cfg, 2, precision=precision)
    return engine


def step_time(engine, cfg, batch, steps, precision):
    from rin_scale.diffusion import training_loss

    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        with precision.autocast(batch[0].device):
            loss, _ = training_loss(engine, batch[0], cfg.diffusion, labels=batch[1])
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
    return times[1:]


def timing(a, cfg, precision, batch, rank):
    from rin_scale import engine as eng

    per = {label: [] for label, *_ in SETTINGS}
    real = eng.comm_buckets
    for r in range(a.rounds):
        for label, overlap, mb in SETTINGS:
            eng.comm_buckets = (lambda *x: {}) if overlap is None else real  # None: DeepSpeed's defaults
            engine = build(cfg, overlap, mb, precision)
            per[label] += step_time(engine, cfg, batch, a.steps, precision)
            del engine
        if rank == 0:
            print(f"round {r + 1}/{a.rounds} done", flush=True)
    eng.comm_buckets = real
    return {k: statistics.median(v) for k, v in per.items()}


def bf16_error(cfg, batch, precision):
    import torch
    from deepspeed.utils import safe_get_full_grad

    from rin_scale.diffusion import training_loss

    grads = {}
    for reduce_bf16 in (False, True):
        cfg.train.reduce_bf16 = reduce_bf16
        engine = build(cfg, True, 50.0, precision)
        torch.manual_seed(1)
        with precision.autocast(batch[0].device):
            loss, _ = training_loss(engine, batch[0], cfg.diffusion, labels=batch[1])
        engine.backward(loss)
        grads[reduce_bf16] = [safe_get_full_grad(p).float().clone() for p in engine.module.parameters()]
        engine.zero_grad()
        del engine
    num = sum(((b - f) ** 2).sum() for f, b in zip(grads[False], grads[True])) ** 0.5
    den = sum((f ** 2).sum() for f in grads[False]) ** 0.5
    worst = max(((b - f).norm() / f.norm().clamp_min(1e-30)).item() for f, b in zip(grads[False], grads[True]))
    return (num / den).item(), worst


def worker(a):
    import torch

    from rin_scale.config import load_config
    from rin_scale.engine import Precision, init_distributed
    from rin_scale.perf import native_cpu_bf16

    rank, world, _ = init_distributed()
    # eager LAMB: a compile per engine built would cost more than the timed steps
    cfg = load_config(a.preset, [f"train.global_batch={2 * a.micro}", "train.zero_stage=2", "train.compile_optimizer=never"])
    prec = Precision("bf16" if native_cpu_bf16() else "fp32", "bench")
    g = torch.Generator().manual_seed(rank)
    m = cfg.model
    batch = (torch.rand((a.micro, *m.sample_shape), generator=g) * 2 - 1,
             torch.randint(0, max(m.num_classes, 1), (a.micro,), generator=g) if m.num_classes else None)
    med = timing(a, cfg, prec, batch, rank)
    err = bf16_error(cfg, batch, Precision("bf16", "bench")) if native_cpu_bf16() else None
    if rank == 0:
        from rin_scale.flops import count

        base = med["deepspeed default"]
        params = count(m)["params"]
        print(f"\n{a.preset}: {params / 1e6:.1f}M parameters ({params * 4 / 2**20:.0f} MB of fp32 gradients), "
              f"ZeRO-2, 2 gloo ranks x 1 thread, micro-batch {a.micro}, {prec.name}; "
              f"medians of {a.rounds} x {a.steps} steps")
        print("| setting | step (s) | vs DeepSpeed default |\n| --- | --- | --- |")
        for label, *_ in SETTINGS:
            print(f"| {label} | {med[label]:.3f} | {med[label] / base:.3f} |")
        if err is not None:
            print(f"\nbf16 gradient reduction (train.reduce_bf16=true) against fp32, one backward: relative error "
                  f"{err[0]:.2e} over all gradients, largest per tensor {err[1]:.2e}")


def main():
    a = parse()
    if "RANK" in os.environ:
        worker(a)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    from rin_scale.engine import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           os.path.abspath(__file__), *sys.argv[1:]]
    sys.exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
