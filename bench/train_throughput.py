"""Training-step throughput and MFU of the cifar10 preset (32x32), batch 8, one process, fp32 vs bf16.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_throughput.py [--steps 6] [--batch 8]

The step is the trainer's: a DeepSpeed engine (ZeRO-0, world of one) and diffusion.training_loss
with the self-conditioning pass. FLOPs: rin_scale.flops (3x the graded forward + the no-grad
self-conditioning forward). Peak: an n x n matmul probe in the same precision, in this run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rin_scale.config import load_config  # noqa: E402
from rin_scale.diffusion import training_loss  # noqa: E402
from rin_scale.engine import Precision, build_engine, init_distributed  # noqa: E402
from rin_scale.flops import train_flops_per_example  # noqa: E402
from rin_scale.model import RIN  # noqa: E402
from rin_scale.perf import matmul_peak  # noqa: E402


def measure(precision: str, batch: int, steps: int) -> dict:
    cfg = load_config("cifar10", [f"train.global_batch={batch}", "train.zero_stage=0", f"train.precision={precision}",
                                  "train.warmup_steps=10"])
    torch.manual_seed(0)
    engine, _, _ = build_engine(RIN(cfg.model), cfg, 1)
    prec = Precision(precision, "benchmark")
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    times = []
    for i in range(steps + 1):  # one warm-up step
        t0 = time.perf_counter()
        with prec.autocast(torch.device("cpu")):
            loss, _ = training_loss(engine, x, cfg.diffusion)
        engine.backward(loss)
        engine.step()
        if i >= 1:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]  # median
    flops = train_flops_per_example(cfg.model, cfg.diffusion.self_cond_rate) * batch
    peak = matmul_peak(prec.dtype, torch.device("cpu"), seconds=1.0, n=1024)
    return {"precision": precision, "step_s": step, "img_s": batch / step, "tflops": flops / step / 1e12,
            "peak": peak / 1e12, "mfu": flops / step / peak}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    init_distributed()
    rows = [measure(prec, args.batch, args.steps) for prec in ("fp32", "bf16")]
    print(f"\ncifar10 preset, 32x32, batch {args.batch}, 1 process, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps\n")
    print("| precision | step (s) | images/s | achieved TFLOP/s | matmul peak TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['step_s']:.3f} | {r['img_s']:.1f} | {r['tflops']:.3f} | {r['peak']:.3f} "
              f"| {r['mfu']:.1%} |")
    print(f"\nbf16 / fp32 speed: {rows[1]['img_s'] / rows[0]['img_s']:.2f}x")


if __name__ == "__main__":
    main()
