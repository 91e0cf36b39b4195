"""Train a RIN diffusion model with DeepSpeed (ZeRO 0-3, activation checkpointing, bf16 or fp32).

    python -m rin_scale.train tiny data.shards=DIR train.run_dir=runs/x          # one process
    torchrun --nproc_per_node=2 -m rin_scale.train tiny data.shards=DIR ...      # two processes
    python -m rin_scale.train imagenet1024 --dry-run                             # config, size, FLOPs

Arguments: [PRESET] [file.yaml ...] [section.key=value ...]. RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT come from the launcher (torchrun, deepspeed, submitit); none means one
process. Re-running the same command resumes from the newest complete state in RUN/states.
Writes RUN/config.yaml, RUN/states/, RUN/snapshots/, RUN/tb/ and RUN/train_log.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


import torch
import torch.distributed as dist

from . import rundir, storage
from .config import ConfigError, check_world, dump_yaml, load_config, to_dict

NOISE_BUCKETS = 4  # loss is also logged per quarter of t in [0, 1]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m rin_scale.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="*", help="[PRESET] [file.yaml ...] [section.key=value ...]")
    p.add_argument("--dry-run", action="store_true", help="resolve and validate the config, print the model's "
                   "size, GFLOPs and the DeepSpeed config, and exit")
    # The DeepSpeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def dry_run(cfg) -> None:
    from .engine import ds_config
    from .flops import count
    from .perf import train_flops_per_example

    world = int(os.environ.get("WORLD_SIZE", "1"))
    c = count(cfg.model)  # builds the model on the meta device: no memory, any size
    print(dump_yaml(cfg))
    print(f"model: {c['params'] / 1e6:.2f}M parameters, {c['gflops']:.2f} forward GFLOPs per example, "
          f"{c['interface_tokens']} interface tokens, {c['latent_tokens']} latents")
    print(f"training step: {train_flops_per_example(cfg.model, cfg.diffusion.self_cond_rate) / 1e9:.2f} "
          f"GFLOPs per example (3x forward + the self-conditioning forward)")
    print(f"DeepSpeed config for {world} rank(s):\n{json.dumps(ds_config(cfg, world), indent=1)}")


class Batches:
    """Endless micro-batches from the ShardLoader; times the wait for data."""

    def __init__(self, loader):
        self.loader, self.it, self.wait = loader, iter(loader), 0.0

    def next(self):
        t0 = time.perf_counter()
        batch = next(self.it)
        self.wait += time.perf_counter() - t0
        return batch


def split_clip(x, model_cfg):
    """(x0, cond): video clips are split into the clean conditioning frames and the frames to predict."""
    if model_cfg.is_video and model_cfg.cond_frames:
        return x[:, :, model_cfg.cond_frames:], x[:, :, :model_cfg.cond_frames]
    return x, None


def log0(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[train] {msg}", flush=True)


def all_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values = values / dist.get_world_size()
    return values


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(None, args.config)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if args.dry_run:
        try:
            check_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        except ConfigError as e:
            sys.exit(f"config error: {e}")
        dry_run(cfg)
        return 0
    from .data import DataError

    try:
        return train(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (DataError, TrainingError) as e:
        sys.exit(f"[train] stopped: {e}")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. non-finite steps in a row); the message names the fix."""


def train(cfg) -> int:
    from .checkpoint import (find_resume, load_state, local_state_root, save_state, saved_world_size,
                             set_rng_state, universal_for)
    from .data import ShardLoader
    from .diffusion import training_loss
    from .ema import EMA
    from .engine import Precision, build_engine, choose_precision, device, init_distributed
    from .model import RIN
    from .perf import device_peak, memory_gb, train_flops_per_example

    t, run = cfg.train, cfg.train.run_dir
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty: point it at a shard folder or manifest, e.g. "
                          "data.shards=runs/demo/data/digits-train (make one with python -m data_tools.shard)")
    rank, world, _ = init_distributed()
    micro, accum = check_world(cfg, world)
    local_state_root(cfg)  # fail now, not at the first save, if the state folder is unusable
    dev = device()

    # Precision and the peak for MFU: rank 0 measures, every rank uses its answer.
    decision = [None]
    if rank == 0:
        prec = choose_precision(t.precision, dev)
        peak, peak_src = device_peak(dev, prec.dtype, t.peak_tflops)
        decision = [(prec.name, prec.reason, peak, peak_src)]
    dist.broadcast_object_list(decision, src=0)
    prec, peak, peak_src = Precision(*decision[0][:2]), decision[0][2], decision[0][3]
    log0(rank, f"{world} rank(s) on {dev.type}, ZeRO-{t.zero_stage}, micro-batch {micro} x {accum} accumulation "
               f"x {world} = {t.global_batch}; precision {prec.name} ({prec.reason}); "
               f"peak {peak / 1e12:.2f} TFLOP/s per device ({peak_src})")

    # The newest complete state, found first: one saved by another world size under ZeRO 1-3 is
    # loaded through DeepSpeed's universal checkpoint, which the engine must know of when built.
    resume = find_resume(cfg)
    universal = ""
    if resume is not None and t.zero_stage > 0 and saved_world_size(resume[1]) != world:
        universal = universal_for(resume[1], t.zero_stage)

    # Model, engine, EMA. Same seed on every rank: identical initial weights.
    torch.manual_seed(t.seed)
    model = RIN(cfg.model).to(dev)
    engine, _, _ = build_engine(model, cfg, world, load_universal=bool(universal))
    ema = EMA(engine.module, t.ema_decay)
    flops_per_example = train_flops_per_example(cfg.model, cfg.diffusion.self_cond_rate)

    if rank == 0:
        fs, path = storage.fs_path(storage.join(run, "config.yaml"))
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if not fs.exists(path):
            with fs.open(path, "w") as f:
                f.write(dump_yaml(cfg))

    # Built before the RNG is set or restored: its weight init must not shift rank 0's stream.
    sampler = Sampler(cfg, dev) if rank == 0 and t.sample_every else None

    # Resume from the newest complete state, or start fresh.
    step, images_seen, wall_before, loader_state, rng = 0, 0, 0.0, None, None
    if resume is not None:
        meta, rng, loader_state = load_state(engine, resume[1], ema, universal)
        step, images_seen, wall_before = meta["step"], meta["images_seen"], meta.get("wall_time", 0.0)
        log0(rank, f"resumed from {resume[1]} at step {step} ({images_seen} images seen, "
                   f"saved by {meta['world_size']} rank(s))")
    if rng is not None:
        set_rng_state(rng)
    else:  # fresh, or a new world size: a seed per rank (and per resume point)
        torch.manual_seed(t.seed + 1 + rank + 7919 * step)
    train_log = TrainLog(run, rank, step)

    loader = ShardLoader(cfg.data, cfg.model, micro, rank, world, state=loader_state)
    batches = Batches(loader)
    tb = None
    if rank == 0:
        from .tblog import TBLog

        tb = TBLog(run)
        if step == 0:
            flat = {f"{s}.{k}": v for s, d in to_dict(cfg).items() if isinstance(d, dict) for k, v in d.items()}
            tb.hparams({k: v for k, v in flat.items() if k.split(".")[0] in ("model", "diffusion", "train")},
                       {"hparam/final_loss": float("nan")})

    # The loop: one iteration = one optimizer step over the global batch.
    t_start = time.time()
    last_log_time, last_log_step, skipped_in_a_row, skipped_total = time.perf_counter(), step, 0, 0
    window = {"loss": 0.0, "n": 0, "bucket_sum": torch.zeros(NOISE_BUCKETS), "bucket_n": torch.zeros(NOISE_BUCKETS),
              "step_time": 0.0, "wait": 0.0}
    while step < t.total_steps:
        t0 = time.perf_counter()
        wait0 = batches.wait
        losses = []
        for _ in range(accum):
            batch = batches.next()
            x0, cond = split_clip(batch["x"].to(dev, non_blocking=True), cfg.model)
            labels = batch["label"].to(dev) if cfg.model.num_classes else None
            with prec.autocast(dev):
                loss, details = training_loss(engine, x0, cfg.diffusion, labels=labels, cond=cond)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            bucket = (details["t"].float().cpu() * NOISE_BUCKETS).long().clamp(max=NOISE_BUCKETS - 1)
            window["bucket_sum"].index_add_(0, bucket, details["loss"].float().cpu())
            window["bucket_n"].index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float32))
        step += 1
        images_seen += t.global_batch

        skipped = not engine.was_step_applied()  # the optimizer (ZeRO-0) or ZeRO found a non-finite gradient
        if skipped:
            skipped_in_a_row += 1
            skipped_total += 1
            if skipped_in_a_row > t.max_nonfinite:
                raise TrainingError(f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient (step "
                                    f"{step}): lower train.lr or set train.grad_clip"
                                    + (", or use train.precision=fp32" if prec.name == "bf16" else ""))
        else:
            skipped_in_a_row = 0
            ema.update(ema.decay_at(step, t.ema_warmup))

        loss_mean = all_mean(torch.stack(losses).mean().cpu().reshape(1)).item()
        lr = engine.get_lr()[0]
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        if dev.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - t0
        window["loss"] += loss_mean
        window["n"] += 1
        window["step_time"] += step_time
        window["wait"] += batches.wait - wait0
        train_log.append({"step": step, "loss": loss_mean, "lr": lr, "images_seen": images_seen,
                          "grad_norm": grad_norm, "skipped": skipped})

        if step % t.log_every == 0 or step == t.total_steps:
            bucket_n = all_mean(window["bucket_n"].clone())
            buckets = all_mean(window["bucket_sum"].clone()) / bucket_n.clamp_min(1e-9)
            now = time.perf_counter()
            n = window["n"]
            img_s = (step - last_log_step) * t.global_batch / max(now - last_log_time, 1e-9)
            achieved = img_s * flops_per_example / world  # per device
            mem = memory_gb(dev)
            if rank == 0:
                scalars = {"train/loss": window["loss"] / n, "train/lr": lr, "train/grad_norm": grad_norm,
                           "perf/images_per_sec": img_s, "perf/step_time": window["step_time"] / n,
                           "perf/data_wait": window["wait"] / n, "perf/tflops": achieved / 1e12,
                           "perf/mfu": achieved / peak, "perf/memory_gb": mem["peak_gb"],
                           "train/images_seen": images_seen, "train/skipped_steps": skipped_total}
                scalars.update({f"loss_by_t/{i / NOISE_BUCKETS:.2f}-{(i + 1) / NOISE_BUCKETS:.2f}": buckets[i].item()
                                for i in range(NOISE_BUCKETS) if bucket_n[i] > 0})
                tb.scalars(scalars, step)
                eta = (t.total_steps - step) * (now - last_log_time) / max(step - last_log_step, 1)
                log0(rank, f"step {step}/{t.total_steps} loss {window['loss'] / n:.4f} lr {lr:.2e} "
                           f"{img_s:.1f} img/s mfu {achieved / peak:.1%} data-wait {window['wait'] / n:.3f}s "
                           f"mem {mem['peak_gb']:.2f}GB eta {_hms(eta)}")
                train_log.flush()
            last_log_time, last_log_step = now, step
            window = {"loss": 0.0, "n": 0, "bucket_sum": torch.zeros(NOISE_BUCKETS),
                      "bucket_n": torch.zeros(NOISE_BUCKETS), "step_time": 0.0, "wait": 0.0}

        final = step == t.total_steps
        want_samples = sampler is not None and (step % t.sample_every == 0 or final)
        want_snapshot = step % t.snapshot_every == 0 or final
        ema_full = ema.full_state() if (want_snapshot or (t.sample_every and (step % t.sample_every == 0 or final))) \
            else None  # collective under ZeRO-3: every rank takes part
        wall = wall_before + time.time() - t_start
        if rank == 0 and want_samples:
            tb.image("samples/ema", sampler.grid(ema_full), step)
        if rank == 0 and want_snapshot:
            rundir.write_snapshot(run, step, ema_full, cfg, {"images_seen": images_seen, "wall_time": wall})
            rundir.prune(run, "snapshots", t.keep_last, t.milestone_every)
        if step % t.state_every == 0 or final:
            save_state(engine, cfg, step, ema, loader.state_dict(),
                       {"images_seen": images_seen, "wall_time": wall})
        if rank == 0 and (want_samples or want_snapshot):
            tb.flush()

    if rank == 0:
        train_log.flush()
        tb.close()
        log0(rank, f"done: {step} steps, {images_seen} images, {_hms(time.time() - t_start)} this job; "
                   f"loader {loader.stats}")
    dist.barrier()
    return 0


class Sampler:
    """EMA samples from fixed noise (and fixed labels / conditioning frames) for TensorBoard."""

    def __init__(self, cfg, dev):
        from .model import RIN

        m = cfg.model
        self.cfg, self.dev = cfg, dev
        self.model = RIN(m).to(dev).eval()
        n = cfg.train.sample_count
        g = torch.Generator().manual_seed(1234)
        self.noise = torch.randn((n, *m.sample_shape), generator=g)
        self.labels = torch.arange(n) % m.num_classes if m.num_classes else None
        # Video: the first clips of the dataset give the conditioning frames (read apart from the
        # training stream, so the loader's position is untouched).
        self.cond = None
        if m.is_video and m.cond_frames:
            from .data import leading_frames

            self.cond = leading_frames(cfg.data.shards, m, n)

    def grid(self, ema_state: dict) -> torch.Tensor:
        from .diffusion import sample
        from .tblog import sample_grid

        self.model.load_state_dict(ema_state)
        labels = self.labels.to(self.dev) if self.labels is not None else None
        cond = self.cond.to(self.dev) if self.cond is not None else None
        x = sample(self.model, self.noise.shape, self.cfg.diffusion, labels=labels, cond=cond,
                   noise=self.noise.to(self.dev), generator=torch.Generator().manual_seed(0))
        if cond is not None:  # show the given frames before the predicted ones
            x = torch.cat([cond, x], dim=2)
        return sample_grid(x, nrow=self.cfg.model.num_classes or 0)


class TrainLog:
    """RUN/train_log.jsonl from rank 0: one JSON line per step (step, loss, lr, images_seen, ...).
    On resume, lines past the resumed step (work lost with the killed job) are dropped."""

    def __init__(self, run: str, rank: int, resume_step: int):
        self.url, self.rank, self.pending = storage.join(run, "train_log.jsonl"), rank, []
        if rank != 0:
            return
        rows = [r for r in storage.read_jsonl(self.url) if r.get("step", 0) <= resume_step]
        fs, path = storage.fs_path(self.url)
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with fs.open(path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        self.rows = rows

    def append(self, row: dict) -> None:
        if self.rank != 0:
            return
        self.pending.append(row)
        if storage.is_local(self.url):
            self.flush()

    def flush(self) -> None:
        if self.rank != 0 or not self.pending:
            return
        if storage.is_local(self.url):
            with open(storage.local_path(self.url), "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.pending))
        else:  # object stores cannot append: rewrite the whole file
            self.rows += self.pending
            fs, path = storage.fs_path(self.url)
            with fs.open(path, "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.rows))
        self.pending = []


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


if __name__ == "__main__":
    sys.exit(main())
