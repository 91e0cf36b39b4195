"""Train a RIN diffusion model with DeepSpeed (ZeRO 0-3, activation checkpointing, bf16 or fp32).

    python -m rin_scale.train tiny data.shards=DIR train.run_dir=runs/x          # one process
    torchrun --nproc_per_node=2 -m rin_scale.train tiny data.shards=DIR ...      # two processes
    python -m rin_scale.train imagenet1024 --dry-run                             # config, size, FLOPs

Arguments: [PRESET] [file.yaml ...] [section.key=value ...]. RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT come from the launcher (torchrun, deepspeed, submitit); none means one
process. Re-running the same command resumes from the newest complete state in RUN/states.
Writes RUN/config.yaml, RUN/states/, RUN/snapshots/, RUN/tb/ and RUN/train_log.jsonl.

One trainer per run: rank 0 holds RUN/lease.json (rin_scale.lease) while it trains, and a second
trainer started on the run refuses in one line. A rank started by a launcher (torchrun, deepspeed,
submitit) exits when that launcher is gone instead of training on without it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist

from . import optim, rundir, storage
from .config import ConfigError, check_world, dump_yaml, load_config, to_dict

if TYPE_CHECKING:
    from .engine import Precision

NOISE_BUCKETS = 4  # loss is also logged per quarter of t in [0, 1]
LAUNCHER_CHECK_S = 1.0  # how often a rank looks whether its launcher is still its parent
ORPHANED_EXIT = 70  # the exit status of a rank whose launcher died


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
    from .engine import Precision, ds_config
    from .flops import count, train_flops_per_example

    world = int(os.environ.get("WORLD_SIZE", "1"))
    c = count(cfg.model)  # builds the model on the meta device: no memory, any size
    print(dump_yaml(cfg))
    print(f"model: {c['params'] / 1e6:.2f}M parameters, {c['gflops']:.2f} forward GFLOPs per example, "
          f"{c['interface_tokens']} interface tokens, {c['latent_tokens']} latents")
    print(f"training step: {train_flops_per_example(cfg.model, cfg.diffusion.self_cond_rate) / 1e9:.2f} "
          f"GFLOPs per example (3x forward + the self-conditioning forward)")
    print(f"DeepSpeed config for {world} rank(s):\n{json.dumps(ds_config(cfg, world), indent=1)}")
    bf16 = ds_config(cfg, world, precision=Precision("bf16", ""))["torch_autocast"]
    print(f"bf16 runs (train.precision=bf16, or auto on a GPU) add \"torch_autocast\": {json.dumps(bf16)}")


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
    """The mean over the ranks (collective), reduced on the engine's device (NCCL reduces CUDA tensors
    only) and returned on the device it came from."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        from .engine import device

        where = values.device
        values = values.to(device())
        dist.all_reduce(values)
        values = (values / dist.get_world_size()).to(where)
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
    from .config import mask_secrets
    from .data import DataError
    from .storage import StorageUnavailable

    if "RANK" in os.environ:  # started by a launcher: do not outlive it
        watch_launcher(os.getppid(), int(os.environ["RANK"]))
    try:
        return train(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (DataError, TrainingError, StorageUnavailable) as e:
        sys.exit(f"[train] stopped: {mask_secrets(str(e))}")  # messages quote URLs: no credentials in job logs
    except Exception:
        if _orphaned():  # a peer that left first broke a collective: the launcher's death is the news
            _leave_orphaned()
        raise


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. non-finite steps in a row); the message names the fix."""


_LEASE = None  # rank 0: the lease on RUN this process holds (rin_scale.lease.Lease)
_LAUNCHER: tuple[int, int] | None = None  # (the launcher's pid, this rank) when a launcher started us
_LEAVING = threading.Lock()


def _orphaned() -> bool:
    return _LAUNCHER is not None and os.getppid() != _LAUNCHER[0]


def _leave_orphaned() -> None:
    """One line, the lease released (best effort, bounded: storage may be what hangs), and out."""
    with _LEAVING:  # the watchdog and the main thread may both get here
        parent, rank = _LAUNCHER
        print(f"[train] rank {rank}: its launcher (pid {parent}) is gone; exiting instead of training on "
              f"without it (re-run the same command to resume from the newest complete state)",
              file=sys.stderr, flush=True)
        if _LEASE is not None:
            t = threading.Thread(target=_LEASE.release, args=(2.0,), daemon=True)
            t.start()
            t.join(5.0)
        try:  # this rank's DataLoader workers would otherwise linger until their own parent check
            import multiprocessing

            for child in multiprocessing.active_children():
                child.kill()
        except Exception:  # noqa: BLE001, S110 - leaving regardless
            pass
        os._exit(ORPHANED_EXIT)


def watch_launcher(parent: int, rank: int, every: float = LAUNCHER_CHECK_S) -> threading.Thread:
    """A daemon thread that ends this process, in one line, once its parent (the launcher: torchrun,
    deepspeed, the submitit task's srun) is gone: torchrun starts each rank in a session of its own,
    so killing the launcher leaves the ranks training on, and a re-run would meet them in the run.
    An orphan is re-parented to init or to a subreaper: either way os.getppid() changes."""
    global _LAUNCHER
    _LAUNCHER = (parent, rank)

    def watch():
        while not _orphaned():
            time.sleep(every)
        _leave_orphaned()

    t = threading.Thread(target=watch, name="rin-launcher-watch", daemon=True)
    t.start()
    return t


def check_writable(cfg) -> None:
    """Fail in one line, before any process group or DeepSpeed start-up, when this rank cannot write
    where it will: the run directory (every rank: a probe object, deleted again) and the local
    folder DeepSpeed writes states to. Transient storage errors are waited out."""
    from .checkpoint import local_state_root

    tc = cfg.train
    probe = f".write-probe-{os.uname().nodename}-{os.getpid()}"
    places = [("train.run_dir", tc.run_dir)]
    state_root = local_state_root(cfg)  # ConfigError for a bucket run without train.state_dir
    if tc.state_dir:
        places.append(("train.state_dir", state_root))
    else:
        places.append(("train.run_dir", state_root))
    for key, url in places:
        target = storage.join(url, probe)
        try:
            if storage.is_local(url):
                path = storage.local_path(url)
                os.makedirs(path, exist_ok=True)
                fd = os.open(storage.local_path(target), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.close(fd)
                os.unlink(storage.local_path(target))
            else:
                fs, path = storage.fs_path(target)
                storage.retry(lambda: fs.pipe_file(path, b"probe"), f"checking that {url} is writable")
                storage.retry(lambda: fs.rm(path), f"checking that {url} is writable")
        except Exception as e:  # noqa: BLE001 - any failure to write there ends the start, in one line
            if isinstance(e, storage.StorageUnavailable):
                raise TrainingError(str(e)) from None
            value = tc.run_dir if key == "train.run_dir" else tc.state_dir
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            where = "" if url.rstrip("/") == value.rstrip("/") else f"{url}: "
            raise TrainingError(f"{key}={value!r} is not writable here ({where}{why}): point it at a folder or "
                                f"bucket this job can write") from None


def take_lease(cfg, rank: int) -> None:
    """Rank 0 takes RUN/lease.json (and renews it from a thread); every rank learns the outcome, and
    all of them stop in one line when another trainer holds the run (collective)."""
    global _LEASE
    from .lease import Lease, LeaseHeld

    box = [""]
    if rank == 0:
        lease = Lease(cfg.train.run_dir, log=lambda m: log0(0, m))
        try:
            storage.retry(lease.acquire, f"taking the lease on {cfg.train.run_dir}")
            _LEASE = lease
            lease.start()
        except LeaseHeld as e:
            box = [str(e)]
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait in the broadcast
            box = [f"could not take the lease on {cfg.train.run_dir} ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:300] if str(e) else ''})"]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise TrainingError(box[0])


def release_lease() -> None:
    global _LEASE
    if _LEASE is not None:
        _LEASE.release()
        _LEASE = None


def lease_lost() -> bool:
    return _LEASE is not None and _LEASE.lost.is_set()


# --------------------------------------------------------------------------------------------
# The loop: set up, then one train_step per optimizer step, a log line per window, saves when due


def train(cfg) -> int:
    """Train (or resume) the run `cfg` describes up to train.total_steps; every rank calls it. Rank 0
    holds the run's lease from set-up to the end (released however the trainer ends, except killed)."""
    try:
        return _train(cfg)
    finally:
        release_lease()


def _train(cfg) -> int:
    tr, state = set_up(cfg)
    tc = cfg.train
    meter = Meter(state.step, tr.dev)
    state.started = time.time()
    while state.step < tc.total_steps:
        result = train_step(tr, state, meter)
        if result.stop:  # rank 0's lease was taken over: the run has another trainer now
            why = _LEASE.lost_reason if _LEASE is not None else "rank 0 lost the lease on the run"
            raise TrainingError(f"this trainer no longer holds {storage.join(tc.run_dir, 'lease.json')} ({why}); "
                                f"stopped at step {state.step} without writing it")
        tr.train_log.append({"step": state.step, "loss": result.loss, "lr": result.lr,
                             "images_seen": state.images_seen, "grad_norm": result.grad_norm,
                             "skipped": result.skipped})
        if state.step % tc.log_every == 0 or state.step == tc.total_steps:
            log_window(tr, state, meter, result)
        maybe_save(tr, state)
    if tr.rank == 0:
        tr.train_log.flush()
        tr.tb.close()
        log0(tr.rank, f"done: {state.step} steps, {state.images_seen} images, "
                      f"{_hms(time.time() - state.started)} this job; loader {tr.loader.stats}")
    dist.barrier()
    return 0


class Compute(NamedTuple):
    """What rank 0 measured and every rank uses."""
    precision: Precision
    peak: float  # FLOP/s per device, for MFU
    peak_source: str  # where the peak came from: the config, a GPU table or a matmul probe


@dataclass
class TrainState:
    """Progress: what a training state saves and a resume restores, plus this job's counters."""
    step: int = 0
    images_seen: int = 0
    wall_before: float = 0.0  # seconds trained by this run's earlier jobs
    started: float = field(default_factory=time.time)  # when this job started training
    skipped_in_a_row: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    skipped_total: int = 0

    @property
    def wall_time(self) -> float:
        return self.wall_before + time.time() - self.started


class LossWatch:
    """A warning when the window's loss climbs back above RISE times the lowest window of this job.
    A run can lose its model with every value finite, and nothing else in the log says so:
    `tiny_video` with AdamW beta2 0.99 at a constant lr of 1.5e-3 tripled its loss for ~1,000 steps,
    and at 2e-3 collapsed to a constant output (latents at rms ~1e4). Once per rise: re-armed when
    the loss is back under the line."""
    RISE = 2.0  # window means over 25+ steps vary by well under 2x in a healthy run

    def __init__(self):
        self.best, self.best_step, self.rising = math.inf, 0, False

    def check(self, step: int, loss: float) -> str:
        """The warning to log for this window's mean loss, or ""."""
        if not math.isfinite(loss):
            return ""  # non-finite steps are skipped and counted elsewhere
        if loss < self.best:
            self.best, self.best_step = loss, step
        was, self.rising = self.rising, loss > self.RISE * self.best
        if not self.rising or was:
            return ""
        return (f"warning: loss {loss:.4f} at step {step} is {loss / self.best:.1f}x its lowest ({self.best:.4f} at "
                f"step {self.best_step}): training may be diverging with every value finite. If it stays up, the "
                f"EMA snapshots near step {self.best_step} hold the better model; lower train.lr or lengthen "
                f"train.warmup_steps")


@dataclass
class Trainer:
    """What set_up builds: the engine, and what feeds, averages, logs and previews it."""
    cfg: object
    rank: int
    world: int
    accum: int  # micro-batches per optimizer step on each rank
    dev: torch.device
    compute: Compute
    engine: object  # the DeepSpeed engine
    ema: object
    loader: object  # the ShardLoader (its state is saved)
    batches: Batches
    train_log: TrainLog
    flops_per_example: float  # of one training step
    groups: str  # the optimizer's param groups (optim.make_optimizer), kept in every state
    tb: object = None  # rank 0: TensorBoard
    preview: PreviewGrid | None = None  # rank 0, when train.sample_every
    loss_watch: LossWatch = field(default_factory=LossWatch)


def set_up(cfg) -> tuple[Trainer, TrainState]:
    """Processes, precision, engine, EMA, loader and logs; resumed from the newest complete state
    in RUN/states if there is one."""
    from .checkpoint import check_state_fits, find_resume, load_state, saved_meta, universal_for
    from .data import ShardLoader, check_dataset
    from .ema import EMA
    from .engine import build_engine, device, init_distributed
    from .flops import train_flops_per_example
    from .model import RIN
    from .perf import keep_freed_memory

    tc = cfg.train
    check_writable(cfg)  # one line now, not a traceback after DeepSpeed's start-up
    rank, world, _ = init_distributed()
    micro, accum = check_world(cfg, world)
    check_dataset(cfg.data, cfg.model, micro, world)  # bad data: one line before the engine is built
    take_lease(cfg, rank)  # before anything is written to the run
    dev = device()
    if dev.type == "cpu":  # before the model: every allocation from here on is kept for reuse
        log0(rank, f"CPU memory: {keep_freed_memory()}")

    # The newest complete state, found first: one saved by another world size under ZeRO 1-3 is
    # loaded through DeepSpeed's universal checkpoint, which the engine must know of when built;
    # and a resumed run keeps the precision its first job chose.
    resume = find_resume(cfg)
    saved = saved_meta(resume.folder) if resume is not None else {}
    if resume is not None:  # shapes only: a model on the meta device allocates nothing, draws no random numbers
        with torch.device("meta"):
            check_state_fits(resume.folder, RIN(cfg.model))
    if rank == 0:  # after the check: a refused start leaves the run's config.yaml as it was
        write_config(cfg)
    compute = measure_compute(tc, rank, dev, saved.get("precision"))
    log0(rank, f"{world} rank(s) on {dev.type}, ZeRO-{tc.zero_stage}, micro-batch {micro} x {accum} accumulation "
               f"x {world} = {tc.global_batch}; precision {compute.precision.name} ({compute.precision.reason}); "
               f"peak {compute.peak / 1e12:.2f} TFLOP/s per device ({compute.peak_source})")
    universal = ""
    if resume is not None and tc.zero_stage > 0 and saved["world_size"] != world:
        universal = universal_for(resume.folder, tc.zero_stage)

    # Model, engine, EMA. Same seed on every rank: identical initial weights. A state from before
    # the groups were recorded has LAMB's ZeRO layout of then, one group per tensor, and keeps it.
    torch.manual_seed(tc.seed)
    groups = saved.get("optimizer_groups", "per_tensor") if resume is not None else "by_setting"
    engine, opt, _ = build_engine(RIN(cfg.model).to(dev), cfg, world, load_universal=bool(universal),
                                  precision=compute.precision, groups=groups)
    if tc.optimizer == "lamb":
        how = f"compiled in {optim.COMPILE_SECONDS[dev.type]:.1f} s" if opt.passes else "eager"
        log0(rank, f"LAMB passes {how} (train.compile_optimizer={tc.compile_optimizer})")
    ema = EMA(engine.module, tc.ema_decay)
    state, loaded = TrainState(), None
    if resume is not None:
        loaded = load_state(engine, resume.folder, ema, universal)
        state = TrainState(loaded.meta["step"], loaded.meta["images_seen"], loaded.meta.get("wall_time", 0.0))
        log0(rank, f"resumed from {resume.folder} at step {state.step} ({state.images_seen} images seen, "
                   f"saved by {loaded.meta['world_size']} rank(s))")
        if rank == 0:  # snapshots a killed job wrote after this state belong to a trajectory now abandoned
            for step in rundir.discard_after(tc.run_dir, "snapshots", state.step):
                log0(rank, f"discarded snapshot step {step}: written after the state resumed from")

    # the epoch is whole global batches, so a state saved between steps continues at any world size
    loader = ShardLoader(cfg.data, cfg.model, micro, rank, world, state=loaded.loader if loaded else None,
                         global_batch=tc.global_batch)
    flops = train_flops_per_example(cfg.model, cfg.diffusion.self_cond_rate)
    tr = Trainer(cfg, rank, world, accum, dev, compute, engine, ema, loader, Batches(loader),
                 TrainLog(tc.run_dir, rank, state.step), flops, groups)
    if rank == 0:
        tr.tb = open_tensorboard(cfg, state.step)
        tr.preview = PreviewGrid(cfg, dev) if tc.sample_every else None  # its weight init draws random numbers
    seed_or_restore_rng(tc, rank, state.step, loaded.rng if loaded else None)
    return tr, state


def seed_or_restore_rng(tc, rank: int, step: int, saved: dict | None) -> None:
    """The RNG streams of the training itself (noise, t, dropouts), set last in set_up: from here
    to the first step nothing else draws from the global generators (the preview model is built,
    and the DataLoader seeds its workers from a generator of its own), so a resumed run draws
    exactly what the uninterrupted run drew."""
    from .checkpoint import set_rng_state

    if saved is not None:
        set_rng_state(saved)
    else:  # fresh, or a new world size: a seed per rank (and per resume point)
        torch.manual_seed(tc.seed + 1 + rank + 7919 * step)


def measure_compute(tc, rank: int, dev: torch.device, saved_precision: str | None = None) -> Compute:
    """Precision and the peak for MFU: rank 0 measures, every rank uses its answer (collective).
    precision=auto decides once per run (the probe is timing, and may read otherwise on a busy
    machine): a resumed run keeps what its state was trained in, so it resumes exactly."""
    from .engine import Precision, choose_precision
    from .perf import device_peak

    box = [None]
    if rank == 0:
        if tc.precision == "auto" and saved_precision:
            prec = Precision(saved_precision, "train.precision=auto, as chosen at the run's first start")
        else:
            prec = choose_precision(tc.precision, dev)
        box = [Compute(prec, *device_peak(dev, prec.dtype, tc.peak_tflops))]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def write_config(cfg) -> str:
    """RUN/config.yaml, the config this start trains with (the eval service reads it). Written at the
    first start, and again at any start whose resolved config differs from it (a corrected re-run
    after a start that failed, a longer total_steps): the file it replaces is kept beside it as
    RUN/config-<UTC time it was replaced>.yaml. Returns that file's URL, or "" (none replaced)."""
    import yaml

    run = cfg.train.run_dir
    url, text = storage.join(run, "config.yaml"), dump_yaml(cfg)
    try:
        old = storage.read_bytes(url).decode()
    except FileNotFoundError:
        storage.write_bytes(url, text.encode())
        return ""
    try:
        same = yaml.safe_load(old) == yaml.safe_load(text)
    except yaml.YAMLError:
        same = old == text
    if same:
        return ""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = storage.join(run, f"config-{stamp}.yaml")
    n = 1
    while storage.exists(kept):
        n += 1
        kept = storage.join(run, f"config-{stamp}-{n}.yaml")
    storage.write_bytes(kept, old.encode())
    storage.write_bytes(url, text.encode())
    log0(0, f"config.yaml changed: the new config is written, the previous one kept as {kept}")
    return kept


def open_tensorboard(cfg, step: int):
    from .tblog import TBLog

    tb = TBLog(cfg.train.run_dir)
    if step == 0:
        flat = {f"{s}.{k}": v for s, d in to_dict(cfg).items() if isinstance(d, dict) for k, v in d.items()}
        tb.hparams({k: v for k, v in flat.items() if k.split(".")[0] in ("model", "diffusion", "train")},
                   {"hparam/final_loss": float("nan")})
    return tb


class StepResult(NamedTuple):
    loss: float  # mean over the global batch
    lr: float
    grad_norm: float | None
    skipped: bool  # a non-finite loss or gradient: the optimizer did not step
    stop: bool = False  # rank 0 lost the run's lease: every rank stops (learnt in the loss's all-reduce)


def train_step(tr: Trainer, state: TrainState, meter: Meter) -> StepResult:
    """One optimizer step over the global batch (`accum` micro-batches on each rank), then the EMA."""
    from .diffusion import training_loss
    from .media import to_unit

    cfg, engine = tr.cfg, tr.engine
    t0, wait0 = time.perf_counter(), tr.batches.wait
    losses = []
    for _ in range(tr.accum):
        batch = tr.batches.next()
        x0, cond = split_clip(to_unit(batch["x"].to(tr.dev, non_blocking=True)), cfg.model)
        labels = batch["label"].to(tr.dev, non_blocking=True) if cfg.model.num_classes else None
        with tr.compute.precision.autocast(tr.dev):
            loss, details = training_loss(engine, x0, cfg.diffusion, labels=labels, cond=cond)
        engine.backward(loss)
        # DeepSpeed's gradient-accumulation contract: step() after every micro-batch's backward; the
        # engine steps the optimizer and the LR schedule (and zeroes the gradients) only at the
        # accumulation boundary, every gradient_accumulation_steps-th call.
        engine.step()
        losses.append(loss.detach().float())
        meter.add_noise_levels(details["t"], details["loss"])
    state.step += 1
    state.images_seen += cfg.train.global_batch

    skipped = not engine.was_step_applied()  # the optimizer (ZeRO-0) or ZeRO found a non-finite gradient
    state.skipped_in_a_row = state.skipped_in_a_row + 1 if skipped else 0
    state.skipped_total += int(skipped)
    if state.skipped_in_a_row > cfg.train.max_nonfinite:
        raise TrainingError(f"{state.skipped_in_a_row} steps in a row had a non-finite loss or gradient (step "
                            f"{state.step}): lower train.lr or set train.grad_clip"
                            + (", or use train.precision=fp32" if tr.compute.precision.name == "bf16" else ""))
    if not skipped:
        tr.ema.update(tr.ema.decay_at(state.step, cfg.train.ema_warmup, cfg.train.ema_warmup_offset))

    grad_norm = engine.get_global_grad_norm()
    # The loss and rank 0's "the lease is lost" flag in one all-reduce: no extra collective per step.
    mean = torch.stack(losses).mean()
    both = all_mean(torch.stack([mean, torch.full_like(mean, float(lease_lost()))])).cpu()
    result = StepResult(both[0].item(), engine.get_lr()[0], float(grad_norm) if grad_norm is not None else None,
                        skipped, bool(both[1].item() > 0))  # .item(): the step's work is done here
    meter.add_step(result.loss, time.perf_counter() - t0, tr.batches.wait - wait0)
    return result


class Meter:
    """Sums over the logging window (the steps since the last log line): loss, loss by noise level,
    step time, data wait; and where the window started, for images per second. The noise-level
    sums stay on the training device: copying them to the host every micro-batch would make the
    host wait for the GPU there, instead of queueing the next micro-batch's work."""

    def __init__(self, step: int, dev: torch.device = torch.device("cpu")):
        self.dev = dev
        self.reset(step, time.perf_counter())

    def reset(self, step: int, now: float) -> None:
        self.first_step, self.started = step, now
        self.steps, self.loss, self.step_time, self.data_wait = 0, 0.0, 0.0, 0.0
        self.bucket_sum = torch.zeros(NOISE_BUCKETS, device=self.dev)
        self.bucket_n = torch.zeros(NOISE_BUCKETS, device=self.dev)

    def add_noise_levels(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Per-example losses, summed by the quarter of t in [0, 1] they were drawn in."""
        bucket = (t.detach().float().to(self.dev) * NOISE_BUCKETS).long().clamp(max=NOISE_BUCKETS - 1)
        self.bucket_sum.index_add_(0, bucket, losses.detach().float().to(self.dev))
        self.bucket_n.index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float32))

    def add_step(self, loss: float, step_time: float, data_wait: float) -> None:
        self.steps += 1
        self.loss += loss
        self.step_time += step_time
        self.data_wait += data_wait

    def loss_by_t(self) -> dict:
        """{"loss_by_t/0.00-0.25": mean loss, ...} over all ranks (collective); empty quarters left out."""
        n = all_mean(self.bucket_n.clone()).cpu()
        mean = all_mean(self.bucket_sum.clone()).cpu() / n.clamp_min(1e-9)
        return {f"loss_by_t/{i / NOISE_BUCKETS:.2f}-{(i + 1) / NOISE_BUCKETS:.2f}": mean[i].item()
                for i in range(NOISE_BUCKETS) if n[i] > 0}


def log_window(tr: Trainer, state: TrainState, meter: Meter, last: StepResult) -> None:
    """TensorBoard scalars and a log line for the window (collective), then a new window."""
    from .perf import memory_gb

    tc, step = tr.cfg.train, state.step
    loss_by_t = meter.loss_by_t()
    now = time.perf_counter()
    img_s = (step - meter.first_step) * tc.global_batch / max(now - meter.started, 1e-9)
    achieved = img_s * tr.flops_per_example / tr.world  # per device
    mfu = achieved / tr.compute.peak
    mem = memory_gb(tr.dev)
    if tr.rank == 0:
        n = meter.steps
        loss = meter.loss / n
        tr.tb.scalars({"train/loss": loss, "train/lr": last.lr, "train/grad_norm": last.grad_norm,
                       "perf/images_per_sec": img_s, "perf/step_time": meter.step_time / n,
                       "perf/data_wait": meter.data_wait / n, "perf/tflops": achieved / 1e12, "perf/mfu": mfu,
                       "perf/memory_gb": mem["peak_gb"], "train/images_seen": state.images_seen,
                       "train/skipped_steps": state.skipped_total, "data/errors": tr.loader.stats["errors"],
                       **loss_by_t}, step)
        eta = (tc.total_steps - step) * (now - meter.started) / max(step - meter.first_step, 1)
        log0(tr.rank, f"step {step}/{tc.total_steps} loss {loss:.4f} lr {last.lr:.2e} {img_s:.1f} img/s "
                      f"mfu {mfu:.1%} data-wait {meter.data_wait / n:.3f}s mem {mem['peak_gb']:.2f}GB eta {_hms(eta)}"
                      + (f" data-errors {tr.loader.stats['errors']}" if tr.loader.stats["errors"] else ""))
        warning = tr.loss_watch.check(step, loss)
        if warning:
            log0(tr.rank, warning)
        tr.train_log.flush()
    meter.reset(step, now)


def maybe_save(tr: Trainer, state: TrainState) -> None:
    """What falls due at this step: the TensorBoard sample grid, the EMA snapshot, the full training
    state. The EMA is gathered once for all three (collective under ZeRO-3: every rank takes part)."""
    from .checkpoint import save_state

    tc, step = tr.cfg.train, state.step
    final = step == tc.total_steps
    want_samples = bool(tc.sample_every) and (step % tc.sample_every == 0 or final)
    want_snapshot = step % tc.snapshot_every == 0 or final
    want_state = step % tc.state_every == 0 or final
    if not (want_samples or want_snapshot or want_state):
        return
    ema_full = tr.ema.full_state()
    meta = {"images_seen": state.images_seen, "wall_time": state.wall_time,
            "precision": tr.compute.precision.name}
    if tr.rank == 0 and want_samples:
        from .routing import routing_scalars

        tr.tb.image("samples/ema", tr.preview.grid(ema_full), step)
        records = []  # where the latents read and write, for the first preview noises
        tr.tb.image("routing/maps", tr.preview.routing(records), step)
        tr.tb.scalars(routing_scalars(records), step)
    if tr.rank == 0 and want_snapshot:
        rundir.write_snapshot(tc.run_dir, step, ema_full, tr.cfg, meta)
        rundir.prune_snapshots(tr.cfg)  # keeps what the eval service has not scored yet
    if want_state:
        tr.train_log.flush()  # the rows up to this step outlive the job with the state (buffered on a bucket)
        save_state(tr.engine, tr.cfg, step, ema_full, tr.loader.state_dict(), {**meta, "optimizer_groups": tr.groups})
    if tr.rank == 0 and (want_samples or want_snapshot):
        tr.tb.flush()


class PreviewGrid:
    """EMA samples from fixed noise (and fixed labels / conditioning frames): a TensorBoard image."""

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

    def routing(self, records: list) -> torch.Tensor:
        """Where the latents read and write (rin_scale.routing) for the first 2 fixed noises; after
        grid(), which loads the EMA weights. Fills `records` for routing_scalars."""
        from .routing import routing_image

        k = min(2, self.noise.shape[0])
        labels = self.labels[:k].to(self.dev) if self.labels is not None else None
        cond = self.cond[:k].to(self.dev) if self.cond is not None else None
        return routing_image(self.model, self.noise[:k].to(self.dev), self.cfg.diffusion, labels, cond,
                             generator=torch.Generator().manual_seed(0), panel=96, records=records)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


class TrainLog:
    """RUN/train_log.jsonl from rank 0: one JSON line per step (step, loss, lr, images_seen, ...).
    On resume, lines past the resumed step (work lost with the killed job) are dropped. A local file
    is appended at every step; a bucket's is rewritten at each flush (log lines and state saves)."""

    def __init__(self, run: str, rank: int, resume_step: int):
        self.url, self.rank, self.pending, self.rows = storage.join(run, "train_log.jsonl"), rank, [], []
        if rank != 0:
            return
        self.rows = [r for r in storage.read_jsonl(self.url) if r.get("step", 0) <= resume_step]
        storage.write_bytes(self.url, _jsonl(self.rows).encode())

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
                f.write(_jsonl(self.pending))
        else:  # object stores cannot append: rewrite the whole file
            self.rows += self.pending
            storage.write_bytes(self.url, _jsonl(self.rows).encode())
        self.pending = []


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


if __name__ == "__main__":
    sys.exit(main())
