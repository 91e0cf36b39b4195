"""A GPU machine's acceptance check: one command, under 8 minutes on 1 to 8 GPUs, a table and JSON.

    .venv/bin/python bench/gpu_check.py [--json gpu_check.json] [--only mfu,resume]
    .venv/bin/python bench/gpu_check.py --cpu        # the reduced form, on a CPU (the test suite runs it)

Parts, each in a process of its own under its own time limit (a failure or a timeout is reported
in its row and the other parts still run):
  mfu        imagenet256 forward+backward (the graded pass) and the full training step (both
             forwards, backward, LAMB) in the trainer's precision (auto: bf16 on GPUs), one
             process; MFU against rin_scale.perf's peak, FLOPs from rin_scale.flops.
  sdpa       which scaled-dot-product-attention kernel the model's attention runs (read from the
             profiler's op names), and which of flash / efficient / cudnn / math run at all when
             torch.nn.attention.sdpa_kernel allows that one alone.
  memory     peak memory of an imagenet1024 step at micro-batch 1, activation checkpointing off
             and on (the trainer's: stage by stage), above the memory held between steps.
  resume     the trainer (`tiny`, ZeRO-2, one rank per GPU under torchrun, 2 data workers, on the
             embedded digits) for 100 steps with a state at step 50: killed (kill -9 of the whole
             job) once it has logged steps past the state, then the same command again. The
             resumed run must start at the state and log the losses the killed run logged after
             it bit for bit, and reach the last step.
  nccl       all-reduce bus bandwidth over every GPU (NCCL; 2+ GPUs only).
  sampler    images/s of the eval service's sampler (the preset's sampler and step count, batch
             of --sample-batch) on imagenet256's model with fresh weights.
  inception  images/s of the FID features: the real InceptionV3 (torch-fidelity's) with seeded
             random weights made here (evals.extractors.save_random_inception; no pretrained
             weights are fetched: the cost does not depend on them), fed 256x256 images.
--cpu: the same parts at tiny sizes (the tiny preset narrowed, imagenet1024 narrowed, 8 steps of
2 gloo ranks with the state at step 4, 32x32 images); nccl is skipped there.
Exit status 0 when no part failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]

TAG = "GPUCHECK "
PARTS = ("mfu", "sdpa", "memory", "resume", "nccl", "sampler", "inception")
# Seconds per part on a GPU: together under 8 minutes with the start-up of each process.
# mfu includes torch.compile of imagenet256's LAMB passes (train.compile_optimizer=auto), as the trainer runs it.
LIMITS = {"mfu": 110, "sdpa": 30, "memory": 70, "resume": 150, "nccl": 30, "sampler": 40, "inception": 30}
CPU_LIMIT = 300  # the reduced form on a loaded 2-core machine

# --cpu: the tiny preset at widths 64 and 16 latents (as bench/faults.py drills it).
CPU_MEMORY = ["model.num_blocks=1"]  # with train_memory's narrow widths: imagenet1024's 16,384 tokens, 1 block
SMALL = ["model.latent_dim=64", "model.interface_dim=64", "model.latent_heads=4", "model.read_write_heads=4",
         "model.num_latents=16", "diffusion.sample_steps=4", "train.sample_count=4"]


def emit(result: dict) -> None:
    """A part's result, for the parent to read from the part's output."""
    print(TAG + json.dumps(result), flush=True)


def model_setup(cpu: bool) -> tuple[str, list[str]]:
    """(preset, overrides) of the model the mfu, sdpa and sampler parts measure."""
    return ("tiny", SMALL) if cpu else ("imagenet256", [])


def _dev():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ------------------------------------------------------------------------------------ parts


def part_mfu(a) -> dict:
    import torch

    from rin_scale.engine import choose_precision, init_distributed
    from rin_scale.flops import train_flops_per_example
    from rin_scale.perf import Mfu, device_peak
    from train_throughput import Bench, median

    init_distributed()  # DeepSpeed's engine wants a process group: a world of one
    dev = _dev()
    prec = choose_precision("auto", dev)
    preset, overrides = model_setup(a.cpu)
    b = Bench(a.batch, dev, prec, preset, tuple(overrides))
    peak, source = device_peak(dev, prec.dtype)
    b.fwd_bwd(), b.step()  # warm-up: kernel choice, optimizer state
    fb, step = [], []
    for _ in range(a.rounds):
        fb.append(b.fwd_bwd())
        step.append(sum(b.step()))
    fb_s, step_s = median(fb), median(step)
    mfu = Mfu(peak, source)
    step_flops = train_flops_per_example(b.cfg.model, b.cfg.diffusion.self_cond_rate) * a.batch
    (mfu_fb, warn), (mfu_step, warn2) = mfu(3 * b.fwd / fb_s), mfu(step_flops / step_s)
    return {"preset": preset, "precision": prec.name, "batch": a.batch, "peak_tflops": peak / 1e12,
            "peak_source": source, "fwd_bwd_s": fb_s, "step_s": step_s, "mfu_fwd_bwd": mfu_fb, "mfu_step": mfu_step,
            "warning": warn or warn2, "images_per_s": a.batch / step_s, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}


SDPA_OPS = {  # aten op -> backend; the CPU's flash kernel has an op of its own
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}


def part_sdpa(a) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rin_scale.config import load_config
    from rin_scale.engine import choose_precision
    from rin_scale.model import RIN

    dev = _dev()
    prec = choose_precision("auto", dev)
    preset, overrides = model_setup(a.cpu)
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = RIN(cfg.model).to(dev).eval()
    x = torch.rand(2, *cfg.model.sample_shape, device=dev) * 2 - 1
    labels = torch.zeros(2, dtype=torch.long, device=dev) if cfg.model.num_classes else None

    def forward():
        with torch.no_grad(), prec.autocast(dev):
            model(x, torch.full((2,), 0.5, device=dev), labels)

    def ran(fn) -> list[str]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        names = {e.key for e in prof.key_averages()}
        return sorted({b for op, b in SDPA_OPS.items() if op in names})

    forward()  # warm-up
    used = ran(forward)
    if not used and dev.type == "cuda":
        raise RuntimeError("no scaled_dot_product_attention op seen in the model's forward")
    # Each backend alone, on the latents' self-attention shape in the same precision.
    m = cfg.model
    q = torch.randn(2, m.latent_heads, m.num_latents, m.latent_dim // m.latent_heads, device=dev, dtype=prec.dtype)
    alone = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        try:
            with sdpa_kernel([backend]):
                alone[name] = "runs " + ", ".join(ran(lambda: F.scaled_dot_product_attention(q, q, q)))
        except RuntimeError:  # "No available kernel": torch's warnings say why
            alone[name] = "no kernel"
    return {"precision": prec.name, "alone": alone,
            "attention_runs": ", ".join(used) or "written out (rin_scale.model.attend: short bf16 attention on a CPU)"}


def part_memory(a) -> dict:
    import torch

    from rin_scale.engine import init_distributed
    from train_memory import WIDTHS, _step_peaks, checkpointed_step

    init_distributed()
    dev = _dev()
    precision = "fp32" if a.cpu else "auto"
    overrides = WIDTHS["narrow"] + CPU_MEMORY if a.cpu else []
    # LAMB's eager passes: compiling them (a minute at this size) would not change the activations' peak.
    s = checkpointed_step("imagenet1024", overrides + ["train.compile_optimizer=never"], dev, precision)
    out = {"preset": "imagenet1024", "micro_batch": 1, "model": " ".join(overrides) or "the preset"}
    s.step()  # warm-up: the optimizer's state is made by the first step
    for mode, name in (("off", "off"), ("segments", "on")):
        s.engine.module.checkpoint_fn = s.fns[mode]
        peak = _step_peaks(dev, s.step)
        out[f"ckpt_{name}_fwd_bwd_mib"] = peak["fb"] / 2**20
        out[f"ckpt_{name}_step_mib"] = peak["step"] / 2**20
    if dev.type == "cuda":
        out["gpu_peak_total_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["saved_by_ckpt"] = 1 - out["ckpt_on_fwd_bwd_mib"] / max(out["ckpt_off_fwd_bwd_mib"], 1e-9)
    return out


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def part_resume(a) -> dict:
    from _faults_proc import Job
    from faults import _jsonl, resumed_at  # the train log's rows, a line torn by the kill left out

    nproc = 2 if a.cpu else max(1, _gpus())
    steps, state = (8, 4) if a.cpu else (100, 50)
    work = tempfile.mkdtemp(prefix="rin-gpucheck-")
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    shards = os.path.join(work, "digits")
    subprocess.run([sys.executable, "-m", "data_tools.shard", "--embedded", "digits", "--split", "train",
                    "--shard-size", "64", "--quiet", shards], cwd=ROOT, env=env, check=True, capture_output=True)
    run = os.path.join(work, "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rin_scale.train", "tiny", f"data.shards={shards}", f"train.run_dir={run}",
           "train.zero_stage=2", f"train.global_batch={8 * nproc}", f"train.total_steps={steps}",
           f"train.state_every={state}", f"train.snapshot_every={steps}", f"train.sample_every={steps}",
           "train.log_every=1", "data.workers=2", "train.precision=auto"] + (SMALL if a.cpu else [])
    log = os.path.join(run, "train_log.jsonl")
    jobs = []
    try:
        first = Job("first", cmd, env, ROOT, os.path.join(work, "first.log"))
        jobs.append(first)
        t0 = time.time()
        while first.running():  # kill once two steps after the state are logged
            first.note_tree(every=0.5)
            if os.path.exists(os.path.join(run, "states", f"step-{state:09d}", "COMPLETE")) and \
                    any(r["step"] >= state + 2 for r in _jsonl(log)):
                break
            time.sleep(0.02)
        if not first.running():
            raise RuntimeError(f"the first run ended (exit {first.poll()}) before the kill: {_tail(first)}")
        first.kill()
        killed_s = time.time() - t0
        before = {r["step"]: r["loss"] for r in _jsonl(log) if r["step"] > state}
        second = Job("resumed", cmd, env, ROOT, os.path.join(work, "resumed.log"))
        jobs.append(second)
        rc = second.wait(timeout=None)
        if rc != 0:
            raise RuntimeError(f"the resumed run failed (exit {rc}): {_tail(second)}")
        out = second.output()
        after = {r["step"]: r["loss"] for r in _jsonl(log)}
        resumed = resumed_at(out, had_state=True) == state
        same = all(after.get(s) == loss for s, loss in before.items())
        res = {"ranks": nproc, "steps": steps, "state_step": state, "killed_after_s": round(killed_s, 1),
               "killed_at_step": max(before), "resumed_at_state": resumed, "rows_compared": len(before),
               "losses_identical": same, "reached_end": max(after, default=0) == steps}
        res["resumed_exactly"] = resumed and same and res["reached_end"] and len(before) > 0
        if not res["resumed_exactly"]:
            raise RuntimeError("the resume was not exact: " + json.dumps(res))
        shutil.rmtree(work, ignore_errors=True)  # kept when it failed: its logs say why
        return res
    except RuntimeError as e:
        raise RuntimeError(f"{e} (logs in {work})") from None
    finally:
        for j in jobs:
            j.close()


def _tail(job) -> str:
    from faults import last_line

    return last_line(job.output())


def part_nccl(a) -> dict | str:
    n = _gpus()
    if n < 2:
        return "NCCL all-reduce needs 2+ GPUs" + (" (CPU form)" if a.cpu else f" ({n} here)")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                          os.path.abspath(__file__), "--allreduce-worker"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    rows = [json.loads(ln[len(TAG):]) for ln in out.stdout.splitlines() if ln.startswith(TAG)]
    if out.returncode != 0 or not rows:
        raise RuntimeError(f"torchrun exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}")
    return rows[0]


def allreduce_worker() -> None:
    """One rank: bus bandwidth of fp32 all-reduces (nccl-tests' definition: 2 (n-1)/n x bytes / time)."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    res = {"gpus": world}
    for mib in (16, 256):
        x = torch.ones(mib * 2**18, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        n = 10
        t0 = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / n
        res[f"busbw_{mib}mib_gbps"] = 2 * (world - 1) / world * x.nbytes / dt / 1e9
    if rank == 0:
        emit(res)
    dist.destroy_process_group()


def part_sampler(a) -> dict:
    import torch

    from rin_scale.config import load_config
    from rin_scale.diffusion import sample
    from rin_scale.model import RIN

    dev = _dev()
    preset, overrides = model_setup(a.cpu)
    cfg = load_config(preset, overrides)
    d, m = cfg.diffusion, cfg.model
    sampler, steps = cfg.eval.sampler or d.sampler, cfg.eval.steps or d.sample_steps
    torch.manual_seed(0)
    model = RIN(m).to(dev).eval()
    n = a.sample_batch
    labels = torch.arange(n, device=dev) % m.num_classes if m.num_classes else None

    def run(k):
        t0 = time.perf_counter()
        with torch.no_grad():
            sample(model, (n, *m.sample_shape), d, labels=labels, steps=k, sampler=sampler)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(2)  # warm-up
    timed = min(steps, a.sample_steps)  # the full count extrapolated from these: each step costs the same
    per_step = run(timed) / timed
    return {"preset": preset, "sampler": sampler, "steps": steps, "steps_timed": timed, "batch": n,
            "s_per_step": per_step, "images_per_s": n / (per_step * steps)}


def part_inception(a) -> dict:
    import torch

    from rin_scale.config import EvalConfig
    from evals.bench import timed
    from evals.extractors import Extractor, save_random_inception

    dev = _dev()
    size, n = (32, 2) if a.cpu else (256, 64)
    with tempfile.TemporaryDirectory() as tmp:
        inc = Extractor("fid", EvalConfig(inception_weights=save_random_inception(f"{tmp}/inc.pth")), dev)
        x = torch.rand(n, 3, size, size, device=dev) * 2 - 1
        stats = inc.new_stats()

        def update():
            stats.update(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        t = timed(update, repeat=1 if a.cpu else 3)
    return {"network": "InceptionV3 (torch-fidelity), seeded random weights made here", "image_size": size,
            "batch": n, "images_per_s": n / t}


# ------------------------------------------------------------------------------------ driver


def run_part(name: str, a, work: str) -> dict:
    """One part in a process of its own under its time limit: {"status": ok|skipped|failed|timeout, ...}."""
    from _faults_proc import Job

    limit = a.limit or (CPU_LIMIT if a.cpu else LIMITS[name])
    argv = [sys.executable, os.path.abspath(__file__), "--part", name] + (["--cpu"] if a.cpu else []) + \
        ["--batch", str(a.batch), "--rounds", str(a.rounds), "--sample-batch", str(a.sample_batch),
         "--sample-steps", str(a.sample_steps)]
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
    if a.cpu:  # the CPU form on a GPU machine too
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.time()
    job = Job(name, argv, env, ROOT, os.path.join(work, f"{name}.log"))
    try:
        rc = job.wait(timeout=limit)
        if job.running():
            job.kill(settle=5)
            return {"status": "timeout", "seconds": round(time.time() - t0, 1),
                    "error": f"no result within its {limit} s limit"}
        out = job.output()
        rows = [json.loads(ln[len(TAG):]) for ln in out.splitlines() if ln.startswith(TAG)]
        res = rows[-1] if rows else {"status": "failed", "error": f"exit {rc}: {_last_error(out)}"}
    finally:
        job.close()
    res["seconds"], res["limit_s"] = round(time.time() - t0, 1), limit
    return res


def _last_error(out: str) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def part_main(a) -> None:
    """Run one part here and print its result line (a failure is a result too)."""
    try:
        res = globals()[f"part_{a.part}"](a)
        emit({"status": "skipped", "why": res} if isinstance(res, str) else {"status": "ok", **res})
    except Exception as e:  # noqa: BLE001 - any failure of a part is reported in its row
        emit({"status": "failed", "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"})


def summary(name: str, r: dict) -> str:
    if r["status"] != "ok":
        return r.get("why") or r.get("error", "")
    f = {
        "mfu": lambda: (f"{r['preset']} {r['precision']} batch {r['batch']}: fwd+bwd {_pct(r['mfu_fwd_bwd'])} MFU "
                        f"({r['fwd_bwd_s']:.3f} s), step {_pct(r['mfu_step'])} MFU ({r['step_s']:.3f} s, "
                        f"{r['images_per_s']:.1f} img/s); peak {r['peak_tflops']:.3g} TFLOP/s ({r['peak_source']})"
                        + (f"; {r['warning']}" if r["warning"] else "")),
        "sdpa": lambda: f"{r['precision']} attention runs {r['attention_runs']}; alone: "
                        + "; ".join(f"{k} {v}" for k, v in r["alone"].items()),
        "memory": lambda: (f"{r['preset']} micro-batch 1, fwd+bwd peak: checkpointing off "
                           f"{r['ckpt_off_fwd_bwd_mib']:.0f} MiB, on {r['ckpt_on_fwd_bwd_mib']:.0f} MiB "
                           f"({r['saved_by_ckpt']:.0%} less); whole step off {r['ckpt_off_step_mib']:.0f} / on "
                           f"{r['ckpt_on_step_mib']:.0f} MiB"),
        "resume": lambda: (f"{r['ranks']} rank(s), killed at step {r['killed_at_step']}, resumed at "
                           f"{r['state_step']}: {r['rows_compared']} losses identical, reached step {r['steps']}"),
        "nccl": lambda: f"{r['gpus']} GPUs: bus bandwidth {r['busbw_16mib_gbps']:.0f} GB/s (16 MiB), "
                        f"{r['busbw_256mib_gbps']:.0f} GB/s (256 MiB)",
        "sampler": lambda: (f"{r['preset']} {r['sampler']} {r['steps']} steps, batch {r['batch']}: "
                            f"{r['images_per_s']:.2f} images/s ({r['s_per_step']:.3f} s a step)"),
        "inception": lambda: f"{r['network']}, {r['image_size']}px batch {r['batch']}: {r['images_per_s']:.1f} images/s",
    }[name]
    return f()


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"  # the CPU form's tiny model runs at a small fraction of a percent


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    from train_throughput import cpu_info

    return f"CPU: {cpu_info()['name']}, {os.cpu_count()} CPUs, torch {torch.__version__} (no GPU)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the reduced form, on a CPU")
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated parts (default: all)")
    p.add_argument("--json", default="gpu_check.json", help="where to write the results (default gpu_check.json)")
    p.add_argument("--limit", type=float, default=0, help="seconds per part (default: each part's own)")
    p.add_argument("--batch", type=int, default=0, help="mfu part's batch (default 32 on a GPU, 2 with --cpu)")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds of the mfu part (default 5, 2 with --cpu)")
    p.add_argument("--sample-batch", type=int, default=0, help="sampler batch (default 64, 4 with --cpu)")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps timed (the rest extrapolated)")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.batch = a.batch or (2 if a.cpu else 32)
    a.rounds = a.rounds or (2 if a.cpu else 5)
    a.sample_batch = a.sample_batch or (4 if a.cpu else 64)
    if a.allreduce_worker:
        return allreduce_worker() or 0
    if a.part:
        return part_main(a) or 0
    parts = [s for s in a.only.split(",") if s]
    unknown = [s for s in parts if s not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    if not a.cpu and _gpus() == 0:
        sys.exit("gpu_check: no GPU here (torch.cuda.is_available() is False): run with --cpu for the reduced form")
    head = machine()
    print(f"\n{head}; {'reduced CPU form' if a.cpu else 'GPU form'}\n", flush=True)
    results, t0 = {}, time.time()
    with tempfile.TemporaryDirectory(prefix="rin-gpucheck-") as work:
        for name in parts:
            results[name] = run_part(name, a, work)
            print(f"  {name}: {results[name]['status']} ({results[name]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print("| part | status | seconds | result |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['status']} | {r['seconds']:.0f} | {summary(name, r)} |")
    total = time.time() - t0
    print(f"\ntotal {total:.0f} s; JSON in {a.json}")
    with open(a.json, "w") as f:
        json.dump({"machine": head, "cpu_form": a.cpu, "total_s": round(total, 1), "parts": results}, f, indent=1)
    return 1 if any(r["status"] in ("failed", "timeout") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
