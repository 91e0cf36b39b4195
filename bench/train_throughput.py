"""Training throughput of the cifar10 preset (32x32), batch 8, one process: fp32 and bf16, each
figure a ratio to the matmul peak measured in the same run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_throughput.py [--rounds 5] [--batch 8] [--glibc-default]

Prints the device (on the CPU: lscpu's model name and whether the avx512_bf16 / AMX flags are
there; bf16 is measured only where they are, or on a GPU with bf16), then, measured in rounds
that interleave the precisions (fp32, bf16, fp32, ...), the median of:
  - the matmul peak: F.linear of 1024 x 1024 matrices in the precision (rin_scale.perf.matmul_peak);
  - forward+backward of the graded pass alone: the trainer's model (train mode: dropout, drop-path),
    x_t, gamma, labels and self-conditioning latents, MSE against eps, backward;
  - the self-conditioning forward alone (no grad);
  - the full training step as the trainer runs it: DeepSpeed engine (ZeRO-0, world of one, the
    preset's LAMB), diffusion.training_loss (self-conditioning pass and graded pass), backward,
    optimizer step; split into its forwards, backward and optimizer step. The preset's LAMB runs
    its compiled passes (train.compile_optimizer=auto: 31M parameters); the LAMB step alone is also
    timed with its eager passes, interleaved.
On the CPU glibc keeps freed memory for reuse, as in the trainer (perf.keep_freed_memory;
--glibc-default leaves it as it is), and each step's page faults are counted.
bf16 is the trainer's: torch.autocast over fp32 weights (engine.Precision). FLOPs are counted by
rin_scale.flops (a multiply-add is 2): fwd+bwd = 3 forwards, the step = 4.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rin_scale import optim  # noqa: E402
from rin_scale.config import load_config  # noqa: E402
from rin_scale.diffusion import gamma_fn, training_loss  # noqa: E402
from rin_scale.engine import Precision, build_engine, device, init_distributed  # noqa: E402
from rin_scale.flops import forward_flops  # noqa: E402
from rin_scale.model import RIN  # noqa: E402
from rin_scale.perf import keep_freed_memory, matmul_peak, native_cpu_bf16  # noqa: E402

TARGETS = {"fb_fp32": 0.80, "fb_bf16": 0.65, "step_over_parts": 1.15, "bf16_speedup": 1.8}


def cpu_info() -> dict:
    """lscpu's model name and the CPU flags that give native bf16 (AVX-512-BF16, AMX)."""
    name = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except (OSError, subprocess.CalledProcessError):
        pass
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    amx = sorted(f for f in flags if f.startswith("amx"))
    return {"name": name or "unknown CPU", "avx512_bf16": "avx512_bf16" in flags, "amx": amx,
            "native_bf16": native_cpu_bf16() is True}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Bench:
    """One precision's engine (a bf16 engine runs its forwards in bf16 whatever the caller's
    autocast: engine.ds_config); the same seed gives every precision the same weights."""

    def __init__(self, batch: int, dev: torch.device, prec: Precision, preset: str = "cifar10",
                 overrides: tuple[str, ...] = ()):
        self.dev, self.batch, self.prec = dev, batch, prec
        self.cfg = cfg = load_config(preset, [*overrides, f"train.global_batch={batch}", "train.zero_stage=0",
                                              "train.warmup_steps=10"])
        torch.manual_seed(0)
        self.engine, self.opt, _ = build_engine(RIN(cfg.model).to(dev), cfg, 1, precision=prec)
        self.model = self.engine.module
        self.x0 = torch.rand(batch, *cfg.model.sample_shape, device=dev) * 2 - 1
        self.labels = torch.randint(0, cfg.model.num_classes, (batch,), device=dev)
        # The graded pass's inputs, as diffusion.training_loss makes them.
        self.gamma = gamma_fn(torch.rand(batch), cfg.diffusion.schedule, cfg.diffusion).to(dev)
        self.eps = torch.randn_like(self.x0)
        g = self.gamma.view(-1, 1, 1, 1)
        self.x_t = g.sqrt() * self.x0 + (1 - g).sqrt() * self.eps
        with torch.no_grad():
            self.prev = self.model(self.x_t, self.gamma, self.labels)[1]
        self.fwd = forward_flops(cfg.model) * batch

    def fwd_bwd(self) -> float:
        self.model.zero_grad(set_to_none=True)
        _sync(self.dev)
        t0 = time.perf_counter()
        with self.prec.autocast(self.dev):
            out, _ = self.model(self.x_t, self.gamma, self.labels, self.prev)
            loss = F.mse_loss(out.float(), self.eps)
        loss.backward()
        _sync(self.dev)
        dt = time.perf_counter() - t0
        self.model.zero_grad(set_to_none=True)
        return dt

    def self_cond_fwd(self) -> float:
        _sync(self.dev)
        t0 = time.perf_counter()
        with self.prec.autocast(self.dev), torch.no_grad():
            self.model(self.x_t, self.gamma, self.labels)
        _sync(self.dev)
        return time.perf_counter() - t0

    def step(self) -> tuple[float, float, float]:
        """(both forwards, backward, optimizer step) of one training step, in seconds."""
        _sync(self.dev)
        t0 = time.perf_counter()
        with self.prec.autocast(self.dev):
            loss, _ = training_loss(self.engine, self.x0, self.cfg.diffusion, labels=self.labels)
        _sync(self.dev)
        t1 = time.perf_counter()
        self.engine.backward(loss)
        _sync(self.dev)
        t2 = time.perf_counter()
        self.engine.step()
        _sync(self.dev)
        return t1 - t0, t2 - t1, time.perf_counter() - t2


    def optimizer_ab(self, rounds: int) -> dict[str, float] | None:
        """Median seconds of the LAMB step alone with its eager and its compiled passes, interleaved on
        the same gradients; None when the trainer did not compile them (train.compile_optimizer)."""
        compiled = self.opt.passes
        if not compiled:
            return None
        gen = torch.Generator().manual_seed(0)
        for p in self.model.parameters():
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(p.device)
        times = {"eager": [], "compiled": []}
        for _ in range(rounds):
            for name, passes in (("eager", None), ("compiled", compiled)):
                self.opt.passes = passes
                _sync(self.dev)
                t0 = time.perf_counter()
                self.opt.step()
                _sync(self.dev)
                times[name].append(time.perf_counter() - t0)
        self.opt.passes = compiled
        self.model.zero_grad(set_to_none=True)
        return {k: median(v) for k, v in times.items()}


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="measurement rounds (medians are reported)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--glibc-default", action="store_true",
                   help="leave glibc's malloc as it is, where the trainer makes it keep freed memory (perf.keep_freed_memory)")
    args = p.parse_args()
    init_distributed()
    dev = device()

    if dev.type == "cuda":
        name, native = torch.cuda.get_device_name(dev), torch.cuda.is_bf16_supported()
        print(f"\nDevice: {name}; bf16: {'yes' if native else 'no'}")
    else:
        info = cpu_info()
        name, native = info["name"], info["native_bf16"]
        print(f"\nCPU: {name}; {torch.get_num_threads()} threads; avx512_bf16: {'yes' if info['avx512_bf16'] else 'no'}; "
              f"AMX: {', '.join(info['amx']) or 'no'}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        if not native:
            print("This CPU has no native bf16 (neither AVX-512-BF16 nor AMX): its bf16 matrix multiplies are "
                  "emulated, slower than fp32. Measuring fp32 only.")
        print("CPU memory:", "glibc's malloc as it is (--glibc-default)" if args.glibc_default else keep_freed_memory())
    precs = [Precision("fp32", "bench")] + ([Precision("bf16", "bench")] if native else [])

    benches = {prec.name: Bench(args.batch, dev, prec) for prec in precs}
    b = benches["fp32"]
    for bp in benches.values():  # warm-up: kernel selection, first-touch of buffers, optimizer state
        bp.fwd_bwd(), bp.self_cond_fwd(), bp.step()
    res = {prec.name: {"peak": [], "fb": [], "sc": [], "fwds": [], "bwd": [], "opt": [], "step": [], "faults": []} for prec in precs}
    for _ in range(args.rounds):
        for prec in precs:
            r, bp = res[prec.name], benches[prec.name]
            r["peak"].append(matmul_peak(prec.dtype, dev, seconds=0.5, n=1024))
            r["fb"].append(bp.fwd_bwd())
            r["sc"].append(bp.self_cond_fwd())
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fwds, bwd, opt = bp.step()
            r["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
            r["fwds"].append(fwds), r["bwd"].append(bwd), r["opt"].append(opt), r["step"].append(fwds + bwd + opt)
    m = {k: {q: median(v) for q, v in r.items()} for k, r in res.items()}
    peak32 = m["fp32"]["peak"]

    print(f"\ncifar10 preset, 32x32, batch {args.batch}, 1 process, median of {args.rounds} rounds "
          f"({' and '.join(p.name for p in precs)} interleaved); forward GFLOPs per image "
          f"{b.fwd / args.batch / 1e9:.2f}\n")
    print("| precision | matmul peak TFLOP/s | fwd+bwd (s) | fwd+bwd / peak | fwd+bwd / fp32 peak | self-cond fwd (s) "
          "| step (s) | forwards / backward / optimizer (s) | step / (fwd+bwd + self-cond fwd) | images/s | step MFU | page faults / step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, r in m.items():
        fb_rate = 3 * b.fwd / r["fb"]
        print(f"| {k} | {r['peak'] / 1e12:.3f} | {r['fb']:.3f} | {fb_rate / r['peak']:.1%} | {fb_rate / peak32:.1%} "
              f"| {r['sc']:.3f} | {r['step']:.3f} | {r['fwds']:.3f} / {r['bwd']:.3f} / {r['opt']:.3f} "
              f"| {r['step'] / (r['fb'] + r['sc']):.3f} | {args.batch / r['step']:.1f} "
              f"| {4 * b.fwd / r['step'] / r['peak']:.1%} | {r['faults']:,.0f} |")
    print()
    t = TARGETS
    fb32 = 3 * b.fwd / m["fp32"]["fb"] / peak32
    print(f"fp32 fwd+bwd: {fb32:.1%} of the fp32 peak (target >= {t['fb_fp32']:.0%})")
    if "bf16" in m:
        r = m["bf16"]
        print(f"bf16 fwd+bwd: {3 * b.fwd / r['fb'] / r['peak']:.1%} of the bf16 peak (target >= {t['fb_bf16']:.0%})")
        print(f"bf16 / fp32: step speed {m['fp32']['step'] / r['step']:.2f}x (target >= {t['bf16_speedup']}x), "
              f"fwd+bwd speed {m['fp32']['fb'] / r['fb']:.2f}x, matmul peak {r['peak'] / peak32:.2f}x")
    for k, r in m.items():
        print(f"{k} step / (fwd+bwd + self-cond fwd): {r['step'] / (r['fb'] + r['sc']):.3f} "
              f"(target <= {t['step_over_parts']}); optimizer step {r['opt'] / r['step']:.0%} of the step")
    ab = b.optimizer_ab(args.rounds)
    if ab:
        print(f"LAMB step alone ({sum(p.numel() for p in b.model.parameters()) / 1e6:.0f}M parameters, fp32): eager "
              f"passes {ab['eager']:.3f} s, compiled {ab['compiled']:.3f} s ({ab['eager'] / ab['compiled']:.2f}x; "
              f"compiled once at start-up in {optim.COMPILE_SECONDS[dev.type]:.1f} s)")
    if dev.type == "cpu":
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes on these CPUs skew every figure; "
              "with OMP_WAIT_POLICY unset, OpenMP threads spin while they wait, which a busy machine punishes most)")


if __name__ == "__main__":
    main()
