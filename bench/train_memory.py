"""Memory of the trainer: per-rank model + optimizer bytes at ZeRO 0-3 (2 processes), and peak
memory and step time at full-size token counts (imagenet1024, kinetics600), batch 1, with
activation checkpointing off, of whole blocks, and of each block stage by stage (the trainer's).

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_memory.py [--preset cifar10] [--skip-zero] [--skip-scale]
        [--widths narrow w256] [--steps 3]

Part 1 counts the bytes of the tensors each rank holds after one step (DeepSpeed's engine with
the trainer's LAMB): model parameters (this rank's part), fp32 master partitions (ZeRO 1-3 keep
their own), optimizer state and gradients. Part 2 runs each model in one process and, for each
checkpointing mode, reports the peak memory of a step above the memory held between steps (see
scale_worker) and the median step time, the modes interleaved.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NARROW = ["model.interface_dim=64", "model.latent_dim=128", "model.latent_heads=4", "model.read_write_heads=4",
          "model.num_latents=64", "model.interface_mlp_ratio=2", "model.latent_mlp_ratio=2"]
# Reduced models at the presets' full token counts (the full ones take minutes a step on 2 CPU cores).
WIDTHS = {
    # interface 64 (MLP ratio 2), latents 64 x 128 (ratio 2), 4 heads; the preset's depth
    "narrow": NARROW,
    # interface 256 with the preset's MLP ratio 4 (the full model: 512), the preset's latent count
    # (imagenet1024: 304) x 256 (full: 1024), 8 heads; 2 blocks x 2 layers (full: 6 x 4)
    "w256": ["model.interface_dim=256", "model.latent_dim=256", "model.latent_heads=8", "model.read_write_heads=8",
             "model.interface_mlp_ratio=4", "model.latent_mlp_ratio=4", "model.num_blocks=2", "model.latent_layers=2"],
    # the preset's widths (imagenet1024: interface 512, latents 304 x 1024, 16 heads), 2 blocks x 1 layer
    "full2x1": ["model.num_blocks=2", "model.latent_layers=1"],
    # the preset itself (imagenet1024: 6 blocks x 4 layers): about a minute a step on 2 cores
    "full": [],
}
WIDTH_NAMES = {"narrow": "interface 64, latents 64 x 128, MLP ratios 2, preset depth",
               "w256": "interface 256 (MLP ratio 4), preset latent count x 256, 2 blocks x 2 layers",
               "full2x1": "the preset's widths, 2 blocks x 1 layer", "full": "the preset as it is"}


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


MODES = ("off", "block", "segments")  # activation checkpointing of every block: none, whole, stage by stage


def checkpointed_step(preset: str, overrides: list[str], dev, precision: str = "fp32"):
    """The preset (with `overrides`) at batch 1 in a one-process engine (ZeRO-0): a namespace of
    cfg, engine, fns (checkpointing mode -> the model's checkpoint_fn), inputs (x0, labels, cond)
    and step(before_optimizer) -> seconds of one training step."""
    import types

    import torch

    from rin_scale.config import load_config
    from rin_scale.diffusion import training_loss
    from rin_scale.engine import build_engine, configure_checkpointing
    from rin_scale.model import RIN
    from rin_scale.train import split_clip

    cfg = load_config(preset, overrides + ["train.activation_checkpointing=1", "train.global_batch=1",
                                           "train.zero_stage=0", f"train.precision={precision}"])
    torch.manual_seed(0)
    engine, _, _ = build_engine(RIN(cfg.model).to(dev), cfg, 1)
    model = engine.module
    staged = model.checkpoint_fn  # the trainer's: stage by stage (engine.by_stage)
    configure_checkpointing(model, cfg, whole_blocks=True)
    whole = model.checkpoint_fn
    m = cfg.model
    shape = (1, m.channels, m.frames, m.image_size, m.image_size) if m.is_video else \
        (1, m.channels, m.image_size, m.image_size)
    x0, cond = split_clip(torch.rand(shape, device=dev) * 2 - 1, m)
    labels = torch.zeros(1, dtype=torch.long, device=dev) if m.num_classes else None

    def step(before_optimizer=lambda: None):
        t0 = time.perf_counter()
        loss, _ = training_loss(engine, x0, cfg.diffusion, labels=labels, cond=cond)
        engine.backward(loss)
        before_optimizer()
        engine.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return types.SimpleNamespace(cfg=cfg, engine=engine, fns={"off": None, "block": whole, "segments": staged},
                                 inputs=(x0, labels, cond), step=step)


def scale_worker(preset: str, width: str, steps: int) -> None:
    """One process, batch 1, the preset at its full token count (narrower / shallower as `width`
    says): for each checkpointing mode, the step time and the peak memory of a step above the
    memory held between steps.

    Time: the median over `steps` steps of each mode, the modes interleaved (the machine's load
    hits them alike).
    Memory, one more step per mode: the peak of live allocations above those held before the
    step, as a GPU's allocator counts it (torch.cuda.max_memory_allocated), over the forwards and
    the backward (what checkpointing changes) and over the whole step (the optimizer's own peak
    included: LAMB holds every tensor's update until the trust ratios are known, another copy
    of the gradients, which can exceed the activations once they are checkpointed). On the CPU:
    glibc's bytes in use (mallinfo2), read after every aten op. The process's one-time costs
    (optimizer state, library code paged in, thread buffers) fall before the baseline; the old
    version of this table took the peak resident set above the start of the process, which
    counted them in every mode and understated what checkpointing saves. (The resident set also
    depends on how glibc's heap fragments: with the default heap the same steps peak 100-200 MiB
    higher in every mode.)"""
    import torch

    from rin_scale.diffusion import training_loss
    from rin_scale.engine import init_distributed
    from rin_scale.flops import count
    from rin_scale.model import RIN

    init_distributed()
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    s = checkpointed_step(preset, WIDTHS[width], dev)
    cfg, engine, fns, step = s.cfg, s.engine, s.fns, s.step
    model = engine.module
    x0, labels, cond = s.inputs
    m = cfg.model

    def set_mode(mode):
        model.checkpoint_fn = fns[mode]

    for mode in MODES:  # warm-up
        set_mode(mode)
        step()
    times = {mode: [] for mode in MODES}
    for _ in range(steps):
        for mode in MODES:
            set_mode(mode)
            times[mode].append(step())
    peak = {}
    for mode in MODES:
        set_mode(mode)
        peak[mode] = _step_peaks(dev, step)
    # Activations on the same model outside the engine (the engine forbids autograd's own backward).
    plain = RIN(cfg.model).to(dev)
    acts = {}
    for mode in MODES:
        plain.checkpoint_fn = fns[mode]
        acts[mode] = _activation_peak(dev, lambda: training_loss(plain, x0, cfg.diffusion, labels=labels,
                                                                 cond=cond)[0], plain)
    c = count(m)
    print("SCALEMEM " + json.dumps({"preset": preset, "width": width, "tokens": c["interface_tokens"],
                                    "params": c["params"], "gflops": c["gflops"],
                                    "peak": peak, "activations": acts, "step_s": {k: _median(v) for k, v in times.items()},
                                    "device": dev.type}), flush=True)


def _median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def _live_peak(less=lambda: 0):
    """A dispatch mode whose .peak is the largest glibc bytes-in-use, less less(), read after every
    aten op run under it (the CPU has no max_memory_allocated)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LivePeak(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, _malloc_in_use() - less())
            return res

    return LivePeak()


def _step_peaks(dev, step) -> dict:
    """Peak bytes of live allocations above those live before step(): over its forwards and
    backward ("fb"), and over the whole step, optimizer included ("step")."""
    import gc

    import torch

    gc.collect()
    out = {}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(lambda: out.__setitem__("fb", torch.cuda.max_memory_allocated() - base))
        out["step"] = torch.cuda.max_memory_allocated() - base
        return out

    base = _malloc_in_use()
    with _live_peak() as mode:
        step(lambda: out.__setitem__("fb", mode.peak - base))
    out["step"] = mode.peak - base
    return out


def _activation_peak(dev, loss_fn, model) -> int:
    """Peak bytes of activations over a forward and backward: live allocations above those live
    before, less the parameters' gradients allocated so far. This is what checkpointing changes and
    what grows with the micro-batch; a step's peak also holds the gradients (4 bytes a parameter,
    1.5 GiB for imagenet1024) and the engine's copies of them, which dominate at batch 1 and full
    width. The backward is autograd's own (DeepSpeed's engine.backward adds its gradient all-reduce),
    and the gradients are dropped after."""
    import gc

    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    gc.collect()

    def grad_bytes():
        return sum(p.grad.nbytes for p in params if p.grad is not None)

    if dev.type == "cuda":  # no per-op readings there: the peak less all the gradients (a lower bound)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base - grad_bytes()
    else:
        base = _malloc_in_use()
        with _live_peak(less=grad_bytes) as mode:
            loss_fn().backward()
        peak = mode.peak - base
    for p in params:
        p.grad = None
    return peak


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]


def _malloc_in_use() -> int:
    """glibc's bytes in use: the main arena's allocated chunks plus all mmapped ones (mallinfo2)."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        sys.exit("the CPU memory figures need glibc >= 2.33 (mallinfo2)")
    fn.restype = _MallInfo2
    m = fn()
    return m.uordblks + m.hblkhd


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
    p.add_argument("--steps", type=int, default=3, help="timed steps per checkpointing mode (the median is reported)")
    p.add_argument("--widths", nargs="+", default=["narrow", "w256"], choices=sorted(WIDTHS),
                   help="models to run (w256, full2x1, full: imagenet1024 only; full2x1 takes ~20 s a step on 2 cores, full ~1 min)")
    p.add_argument("--skip-zero", action="store_true")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, preset, arg = args.worker[0], args.worker[1], args.worker[2]
        return zero_worker(preset, int(arg)) if kind == "zero" else scale_worker(preset, arg, args.steps)

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
        print(f"\nFull token counts, reduced width, batch 1, fp32, 1 process, {os.environ.get('OMP_NUM_THREADS')} "
              f"threads; peak memory of a step above what is held between steps; median of {args.steps} steps, "
              f"the modes interleaved\n")
        print("| preset | model | tokens | params | fwd GFLOPs | act. ckpt | peak fwd+bwd (MiB) | vs off "
              "| peak step (MiB) | vs off | activations (MiB) | vs off | step (s) | vs off |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        names = {"off": "off", "block": "whole blocks", "segments": "read / compute / write chunks"}
        for preset, width in [(p, w) for p in ("imagenet1024", "kinetics600") for w in args.widths
                              if w == "narrow" or p == "imagenet1024"]:
            r = _run(["--steps", str(args.steps), "--worker", "scale", preset, width], "SCALEMEM ")[0]
            for mode in MODES:
                pk, off, st = r["peak"][mode], r["peak"]["off"], r["step_s"][mode]
                print(f"| {preset} | {width} | {r['tokens']} | {r['params'] / 1e6:.2f}M | {r['gflops']:.1f} | "
                      f"{names[mode]} | {pk['fb'] / mb:.0f} | {pk['fb'] / max(off['fb'], 1):.2f} | "
                      f"{pk['step'] / mb:.0f} | {pk['step'] / max(off['step'], 1):.2f} | "
                      f"{r['activations'][mode] / mb:.0f} | "
                      f"{r['activations'][mode] / max(r['activations']['off'], 1):.2f} | {st:.2f} | "
                      f"{st / r['step_s']['off']:.2f} |", flush=True)
        print("\nModels: " + "; ".join(f"{w}: {WIDTH_NAMES[w]}" for w in args.widths))

if __name__ == "__main__":
    main()
