"""Memory of the trainer: per-rank model + optimizer bytes at ZeRO 0-3 (2 processes), and peak
memory and step time at full-size token counts (imagenet1024, kinetics600) at a narrow width,
batch 1, with activation checkpointing off and on.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_memory.py [--preset cifar10] [--skip-zero] [--skip-scale]

Part 1 counts the bytes of the tensors each rank holds after one step (DeepSpeed's engine with
the trainer's LAMB): model parameters (this rank's part), fp32 master partitions (ZeRO 1-3 keep
their own), optimizer state and gradients. Part 2 runs each configuration in a fresh process and
reports its peak resident memory above the resident memory before the first step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NARROW = ["model.interface_dim=64", "model.latent_dim=128", "model.latent_heads=4", "model.read_write_heads=4",
          "model.num_latents=64", "model.interface_mlp_ratio=2", "model.latent_mlp_ratio=2"]


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen or t.numel() == 0:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def zero_worker(preset: str, stage: int) -> None:
    """One rank of a 2-process run: print a JSON line of this rank's bytes after one step."""
    import torch

    from rin_scale.config import load_config
    from rin_scale.diffusion import training_loss
    from rin_scale.engine import build_engine, init_distributed
    from rin_scale.model import RIN

    rank, world, _ = init_distributed()
    cfg = load_config(preset, [f"train.zero_stage={stage}", "train.global_batch=2", "train.optimizer=lamb",
                               "train.precision=fp32"])
    torch.manual_seed(0)
    engine, opt, _ = build_engine(RIN(cfg.model), cfg, world)
    s = cfg.model.image_size
    loss, _ = training_loss(engine, torch.rand(1, cfg.model.channels, s, s) * 2 - 1, cfg.diffusion)
    engine.backward(loss)
    module_params = list(engine.module.parameters())
    zo = engine.optimizer
    opt_params = [q for g in opt.param_groups for q in g["params"]]
    grads = _bytes([p.grad for p in module_params] + [q.grad for q in opt_params])  # before step frees them
    for name in ("averaged_gradients", "ipg_buffer", "grads_in_partition", "fp32_partitioned_groups_flat_grad"):
        buf = getattr(zo, name, None)
        if isinstance(buf, dict):
            buf = [t for v in buf.values() if v is not None for t in (v if isinstance(v, list) else [v])]
        if isinstance(buf, (list, tuple)):
            grads += _bytes(t for t in buf if torch.is_tensor(t))
        elif torch.is_tensor(buf):
            grads += _bytes([buf])
    engine.step()
    params = _bytes(p.ds_tensor if hasattr(p, "ds_tensor") else p for p in module_params)
    opt_params = [q for g in opt.param_groups for q in g["params"]]
    module_ids = {id(p) for p in module_params} | {id(getattr(p, "ds_tensor", p)) for p in module_params}
    master = _bytes(q for q in opt_params if id(q) not in module_ids)
    state = _bytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    if rank == 0:
        print("ZEROMEM " + json.dumps({"rank": rank, "stage": stage, "params": params, "master": master,
                                       "optimizer": state, "grads": grads}), flush=True)


def scale_worker(preset: str, ckpt: int, steps: int) -> None:
    """One process, batch 1, a narrow model at the preset's full token count: peak memory, step time."""
    import torch

    from rin_scale.config import load_config
    from rin_scale.diffusion import training_loss
    from rin_scale.engine import build_engine, init_distributed
    from rin_scale.flops import count
    from rin_scale.model import RIN
    from rin_scale.train import split_clip

    init_distributed()
    cfg = load_config(preset, NARROW + [f"train.activation_checkpointing={ckpt}", "train.global_batch=1",
                                        "train.zero_stage=0", "train.precision=fp32"])
    torch.manual_seed(0)
    engine, _, _ = build_engine(RIN(cfg.model), cfg, 1)
    m = cfg.model
    shape = (1, m.channels, m.frames, m.image_size, m.image_size) if m.is_video else \
        (1, m.channels, m.image_size, m.image_size)
    x = torch.rand(shape) * 2 - 1
    x0, cond = split_clip(x, m)
    base = _rss()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, _ = training_loss(engine, x0, cfg.diffusion, labels=torch.zeros(1, dtype=torch.long) if m.num_classes
                                else None, cond=cond)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    c = count(m)
    print("SCALEMEM " + json.dumps({"preset": preset, "ckpt": ckpt, "tokens": c["interface_tokens"],
                                    "params": c["params"], "gflops": c["gflops"], "peak_above_base": peak - base,
                                    "peak": peak, "step_s": min(times), "loss": float(loss)}), flush=True)


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run(cmd, tag, nproc=1):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.setdefault("OMP_NUM_THREADS", "1")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    out = subprocess.run(launcher + [os.path.abspath(__file__)] + cmd, env=env, capture_output=True, text=True)
    rows = [json.loads(line.split(tag, 1)[1]) for line in out.stdout.splitlines() if tag in line]
    if out.returncode != 0 or not rows:
        sys.exit(f"worker failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar10", help="model for the ZeRO table (default cifar10, 31M params)")
    p.add_argument("--steps", type=int, default=2, help="steps per scale configuration (the fastest is reported)")
    p.add_argument("--skip-zero", action="store_true")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, preset, n = args.worker[0], args.worker[1], int(args.worker[2])
        return zero_worker(preset, n) if kind == "zero" else scale_worker(preset, n, args.steps)

    mb = 2**20
    if not args.skip_zero:
        print(f"\nPer-rank model + optimizer memory, {args.preset} preset, LAMB, fp32, 2 processes (rank 0; MiB)\n")
        print("| ZeRO | params | fp32 master | optimizer state | grads | total | vs ZeRO-0 |")
        print("|---|---|---|---|---|---|---|")
        base = None
        for stage in (0, 1, 2, 3):
            r = [x for x in _run(["--worker", "zero", args.preset, str(stage)], "ZEROMEM ", nproc=2) if x["rank"] == 0][0]
            total = r["params"] + r["master"] + r["optimizer"] + r["grads"]
            base = base or total
            print(f"| {stage} | {r['params'] / mb:.1f} | {r['master'] / mb:.1f} | {r['optimizer'] / mb:.1f} | "
                  f"{r['grads'] / mb:.1f} | {total / mb:.1f} | {total / base:.2f} |", flush=True)
    if not args.skip_scale:
        print("\nFull token counts at a narrow width (interface 64, latents 64 x 128), batch 1, fp32, 1 process\n")
        print("| preset | tokens | params | fwd GFLOPs | act. ckpt | peak above start (MiB) | step (s) |")
        print("|---|---|---|---|---|---|---|")
        for preset in ("imagenet1024", "kinetics600"):
            res = {}
            for ckpt in (0, 1):
                r = _run(["--steps", str(args.steps), "--worker", "scale", preset, str(ckpt)], "SCALEMEM ")[0]
                res[ckpt] = r
                print(f"| {preset} | {r['tokens']} | {r['params'] / 1e6:.2f}M | {r['gflops']:.1f} | "
                      f"{'every block' if ckpt else 'off'} | {r['peak_above_base'] / mb:.0f} | {r['step_s']:.2f} |",
                      flush=True)
            print(f"| {preset} | | | | on / off | {res[1]['peak_above_base'] / max(res[0]['peak_above_base'], 1):.2f} | "
                  f"{res[1]['step_s'] / res[0]['step_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
