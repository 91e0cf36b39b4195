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
from .checkpoint import Background, StateError
from .config import ConfigError, check_world, dump_yaml, load_config, to_dict
from .watchdog import EXIT_ORPHANED, EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_STOPPED, leave, record_line

if TYPE_CHECKING:
    from .engine import Precision

NOISE_BUCKETS = 4  # loss is also logged per quarter of t in [0, 1]
LAUNCHER_CHECK_S = 1.0  # how often a rank looks whether its launcher is still its parent
ORPHANED_EXIT = EXIT_ORPHANED  # the exit status of a rank whose launcher died


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
        _doing("waiting for data from its DataLoader")
        batch = next(self.it)
        _doing("in forward/backward/optimizer step (DeepSpeed's collectives included)")
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
        _doing("in an all-reduce with every rank")
        dist.all_reduce(values)
        values = (values / dist.get_world_size()).to(where)
    return values


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(None, args.config)
    except ConfigError as e:
        _stop(f"config error: {e}")
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
        _stop(f"config error: {e}")
    except (DataError, TrainingError, StorageUnavailable, StateError) as e:
        _stop(f"[train] stopped: {mask_secrets(_one_line(e))}")  # messages quote URLs: no credentials in job logs
    except Preempted as e:
        _stop(f"[train] {e}", EXIT_PREEMPTED)
    except Exception as e:
        if _orphaned():  # a peer that left first broke a collective: the launcher's death is the news
            _leave_orphaned()
        if _collective_failed(e):
            _stop(_peer_lost_line(e), EXIT_PEER_LOST)
        raise


def _stop(line: str, status: int = EXIT_STOPPED) -> None:
    """The stop's one line: on stderr, and in torchrun's error file for this rank (so the launcher's
    report, and launch.torchrun's last line, give the cause instead of a traceback). Status 1 (the
    default) is a stop a requeue would repeat; the others are retryable (rin_scale.watchdog)."""
    record_line(line)
    if status == EXIT_STOPPED:
        sys.exit(line)
    print(line, file=sys.stderr, flush=True)
    sys.exit(status)


def _collective_failed(e: BaseException) -> bool:
    """A collective broke: torch's DistError, or gloo's and NCCL's RuntimeErrors (a peer closed its
    connection, a timeout)."""
    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or (
        isinstance(e, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "Connection closed by peer",
                                                                "Connection reset", "Broken pipe", "Timed out")))


def _peer_lost_line(e: BaseException) -> str:
    rank = os.environ.get("RANK", "0")
    step = _WATCHDOG.step if _WATCHDOG is not None else "?"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    if "EADDRINUSE" in first:  # the rendezvous, not a peer: another process holds MASTER_PORT
        return (f"[train] rank {rank} (host {os.uname().nodename}): the rendezvous port "
                f"{os.environ.get('MASTER_PORT', '?')} is in use by another process: a launch.submit job "
                f"requeues on another port; under torchrun or with MASTER_PORT set, pick a free one")
    what = "timed out" if "timed out" in first.lower() else "failed"
    return (f"[train] rank {rank} (host {os.uname().nodename}): a collective {what} after step {step} "
            f"({type(e).__name__}: {first}): a peer crashed, stopped or lost its host; exiting so the job "
            f"ends (a launcher requeues it; re-run the same command to resume from the newest complete state)")


def _one_line(e: BaseException) -> str:
    """The message of an error; for one re-raised from a DataLoader worker ("Caught X in DataLoader
    worker process 0." and the worker's traceback), the worker's own message: the last line."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith(type(e).__name__) else last
    return text


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. non-finite steps in a row); the message names the fix."""


class Preempted(RuntimeError):
    """The scheduler asked the job to leave: a state was saved at the step boundary (requeue it)."""


_PREEMPT = threading.Event()  # set by the scheduler's signal (launch.job); carried by the step's all-reduce
_WATCHDOG = None  # this rank's rin_scale.watchdog.Watchdog while the loop runs


def request_save_and_stop() -> None:
    """Safe in a signal handler: every rank saves a state at the next step boundary, then stops."""
    _PREEMPT.set()


def _doing(what: str) -> None:
    if _WATCHDOG is not None:
        _WATCHDOG.doing(what)


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
        _release_lease_bounded()
        leave(ORPHANED_EXIT)  # this rank's DataLoader workers first: they would linger until their own check


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
    storage.configure(cfg.data.storage_retry_seconds)  # uploads and writes wait as long as reads
    try:
        return _train(cfg)
    finally:
        release_lease()


def _train(cfg) -> int:
    tr, state = set_up(cfg)
    try:
        start_watchdog(tr)
        return _loop(tr, state)
    finally:
        if _WATCHDOG is not None:
            _WATCHDOG.stop()


def start_watchdog(tr: Trainer) -> None:
    """This rank's hang watchdog (rin_scale.watchdog), armed from the first step: until then the
    collective timeout covers the start-up. A rank that hangs releases rank 0's lease on its way out."""
    global _WATCHDOG
    from .watchdog import Watchdog, on_fatal

    tc = tr.cfg.train
    if not tc.hang_timeout_s:
        return
    on_fatal(lambda status, line: _release_lease_bounded())
    _WATCHDOG = Watchdog(tc.run_dir, tr.rank, tr.world, tc.hang_timeout_s, tc.collective_timeout_s).start()


def _release_lease_bounded(wait_s: float = 5.0) -> None:
    if _LEASE is not None:  # storage may be what hangs: a bounded try
        t = threading.Thread(target=_LEASE.release, args=(2.0,), daemon=True)
        t.start()
        t.join(wait_s)


def _loop(tr: Trainer, state: TrainState) -> int:
    tc = tr.cfg.train
    meter = Meter(state.step, tr.dev)
    state.started = time.time()
    while state.step < tc.total_steps:
        result = train_step(tr, state, meter)
        if _WATCHDOG is not None:
            _WATCHDOG.progress(state.step)
        if result.stop:  # rank 0's lease was taken over: the run has another trainer now
            why = _LEASE.lost_reason if _LEASE is not None else "rank 0 lost the lease on the run"
            raise TrainingError(f"this trainer no longer holds {storage.join(tc.run_dir, 'lease.json')} ({why}); "
                                f"stopped at step {state.step} without writing it")
        for row in result.rows:  # read back at log and save steps (train_step)
            tr.train_log.append(row)
        if state.step % tc.log_every == 0 or state.step == tc.total_steps:
            _doing(f"logging step {state.step}")
            log_window(tr, state, meter, result)
        _doing(f"saving (or previewing) at step {state.step}")
        maybe_save(tr, state, state_now=result.preempt)
        if result.preempt:  # every rank learnt it in the same all-reduce: all saved, all leave
            raise Preempted(f"rank {tr.rank}: saved a state at step {state.step} on the scheduler's signal; "
                            f"stopping for the requeue (it resumes from there)")
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
    peak_source: str  # where the peak came from: the config, a GPU table or the best matmul probe


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
    mfu: object = None  # perf.Mfu, made at the first log line
    background: Background = field(default_factory=Background)  # rank 0's save finishing (checkpoint.Background)


def set_up(cfg) -> tuple[Trainer, TrainState]:
    """Processes, precision, engine, EMA, loader and logs; resumed from the newest complete state
    in RUN/states if there is one."""
    from .checkpoint import check_shared, check_state_fits, find_resume, load_state, saved_meta, universal_for
    from .data import ShardLoader, check_dataset
    from .ema import EMA
    from .engine import build_engine, device, init_distributed
    from .flops import train_flops_per_example
    from .model import RIN
    from .perf import keep_freed_memory

    tc = cfg.train
    check_writable(cfg)  # one line now, not a traceback after DeepSpeed's start-up
    rank, world, _ = init_distributed(tc.collective_timeout_s)
    micro, accum = check_world(cfg, world)
    check_dataset(cfg.data, cfg.model, micro, world)  # bad data: one line before the engine is built
    take_lease(cfg, rank)  # before anything is written to the run
    check_shared(cfg)  # every rank sees the state folder: one line now, not a state no resume can load
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
    """Precision and the peak for MFU: rank 0 decides, every rank uses its answer (collective).
    precision=auto decides once per run: a resumed run keeps what its state was trained in, so it
    resumes exactly even on another machine."""
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
    loss: float | None  # mean over the global batch; None between reads (see Meter)
    lr: float
    grad_norm: float | None
    skipped: bool  # a non-finite loss or gradient: the optimizer did not step
    stop: bool = False  # rank 0 lost the run's lease: every rank stops (learnt in the loss's all-reduce)
    rows: tuple = ()  # the train log's rows (one per step) read back at this step: a log or save step
    preempt: bool = False  # a rank got the scheduler's signal: every rank saves and stops (same all-reduce)


def step_flags() -> dict:
    """The flags every rank must learn each step, carried by the step's one all-reduce (a max
    over ranks once summed: any rank's flag > 0 is the flag)."""
    return {"lease_lost": float(lease_lost()), "preempt": float(_PREEMPT.is_set())}


def read_due(tc, step: int) -> bool:
    """Whether this step reads the window back to the host: log steps, and every step something is
    saved (the train log's rows up to a state are written with it)."""
    every = [tc.log_every, tc.snapshot_every, tc.state_every] + ([tc.sample_every] if tc.sample_every else [])
    return step == tc.total_steps or any(step % k == 0 for k in every)


def train_step(tr: Trainer, state: TrainState, meter: Meter) -> StepResult:
    """One optimizer step over the global batch (`accum` micro-batches on each rank), then the EMA.
    On a GPU the host does not wait for the device here except at read_due steps: the loss, the
    gradient norm and the flags stay on the device (Meter) and are read back there, the flags a
    step late (a non-blocking copy)."""
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

    # A host bool without a sync of ours: ZeRO 1-3 read their overflow flag on the host inside
    # step() (DeepSpeed's has_overflow), the optimizers of ZeRO-0 theirs (optim._all_finite): the
    # run stops at the very step that made max_nonfinite + 1 in a row.
    skipped = not engine.was_step_applied()
    state.skipped_in_a_row = state.skipped_in_a_row + 1 if skipped else 0
    state.skipped_total += int(skipped)
    if state.skipped_in_a_row > cfg.train.max_nonfinite:
        for row in meter.read():  # the steps before this one, skipped ones included, stay in the log
            tr.train_log.append(row)
        tr.train_log.flush()
        raise TrainingError(f"{state.skipped_in_a_row} steps in a row had a non-finite loss or gradient (step "
                            f"{state.step}): lower train.lr or set train.grad_clip"
                            + (", or use train.precision=fp32" if tr.compute.precision.name == "bf16" else ""))
    if not skipped:
        tr.ema.update(tr.ema.decay_at(state.step, cfg.train.ema_warmup, cfg.train.ema_warmup_offset))

    # The loss and the flags (rank 0's lease, any rank's preemption) in one all-reduce: no extra collective per step.
    mean = torch.stack(losses).mean()
    flags = step_flags()
    summed = all_mean(torch.stack([mean, *(torch.full_like(mean, v) for v in flags.values())]))
    seen = meter.flags.swap(summed[1:])  # on a GPU: the previous step's (the copy is not waited for)
    stop = seen is not None and bool(seen[list(flags).index("lease_lost")] > 0)
    preempt = seen is not None and bool(seen[list(flags).index("preempt")] > 0)
    lr = engine.get_lr()[0]
    meter.add_step(state, summed[0], engine.get_global_grad_norm(), lr, skipped,
                   time.perf_counter() - t0, tr.batches.wait - wait0)
    if not (read_due(cfg.train, state.step) or preempt):  # a preemption saves a state: its rows go with it
        return StepResult(None, lr, None, skipped, stop)
    rows = meter.read()  # the one host sync of the window
    return StepResult(rows[-1]["loss"], lr, rows[-1]["grad_norm"], skipped, stop, tuple(rows), preempt)


class LateRead:
    """A small device tensor read on the host one call later: copied into pinned memory without
    waiting (non_blocking), then read when the next one is handed in, by which time the copy is long
    done. On the CPU the tensor itself is read at once (there is no copy to wait for)."""

    def __init__(self, dev: torch.device):
        self.late = dev.type == "cuda"
        self.pending = None  # (host tensor, event) of the last swap

    def swap(self, t: torch.Tensor) -> torch.Tensor | None:
        """The host copy of the tensor handed in the last call (GPU) or of `t` (CPU)."""
        if not self.late:
            return t.detach().cpu()
        before = self.pending
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (host, event)
        if before is None:
            return None
        before[1].synchronize()
        return before[0]


class Meter:
    """Sums over the logging window (the steps since the last log line): loss, loss by noise level,
    step time, data wait; and where the window started, for images per second. The per-step losses,
    gradient norms and noise-level sums stay on the training device until read() (log and save
    steps): copying them to the host every step would make the host wait for the GPU there,
    instead of queueing the next step's work."""

    def __init__(self, step: int, dev: torch.device = torch.device("cpu")):
        self.dev = dev
        self.flags = LateRead(dev)
        self.unread = []  # (row without loss and grad norm, loss tensor, grad norm) per step not read yet
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

    def add_step(self, state: TrainState, loss: torch.Tensor, grad_norm, lr: float, skipped: bool,
                 step_time: float, data_wait: float) -> None:
        """A step's figures; `loss` and `grad_norm` (DeepSpeed's: a float, a tensor or None) unread."""
        self.steps += 1
        self.step_time += step_time
        self.data_wait += data_wait
        row = {"step": state.step, "lr": lr, "images_seen": state.images_seen, "skipped": skipped}
        self.unread.append((row, loss, grad_norm))

    def read(self) -> list[dict]:
        """The train log's rows of the steps not read yet, in one copy from the device; their
        losses are added to the window's."""
        if not self.unread:
            return []
        norms = [g for _, _, g in self.unread]
        values = torch.stack([loss for _, loss, _ in self.unread]
                             + [torch.as_tensor(g, dtype=torch.float32, device=self.dev).reshape(())
                                for g in norms if g is not None]).cpu().tolist()
        n, rows, k = len(self.unread), [], len(self.unread)
        for (row, _, g), loss in zip(self.unread, values[:n]):
            if g is not None:
                g, k = values[k], k + 1
            rows.append({**row, "loss": loss, "grad_norm": g})
            self.loss += loss
        self.unread = []
        return rows

    def loss_by_t(self) -> dict:
        """{"loss_by_t/0.00-0.25": mean loss, ...} over all ranks (collective); empty quarters left out."""
        n = all_mean(self.bucket_n.clone()).cpu()
        mean = all_mean(self.bucket_sum.clone()).cpu() / n.clamp_min(1e-9)
        return {f"loss_by_t/{i / NOISE_BUCKETS:.2f}-{(i + 1) / NOISE_BUCKETS:.2f}": mean[i].item()
                for i in range(NOISE_BUCKETS) if n[i] > 0}

    def ranks(self, dev: torch.device) -> list[dict]:
        """Every rank's mean step time, data wait and peak memory over the window, and its host
        (collective: an all_gather_object at log steps only)."""
        from .perf import memory_gb

        n = max(self.steps, 1)
        mine = {"step_time": self.step_time / n, "data_wait": self.data_wait / n,
                "memory_gb": memory_gb(dev)["peak_gb"], "host": os.uname().nodename}
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return [mine]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, mine)
        return out


def slowest(ranks: list[dict]) -> tuple[int, dict]:
    """(rank, its figures) of the rank with the longest mean step time."""
    r = max(range(len(ranks)), key=lambda i: ranks[i]["step_time"])
    return r, ranks[r]


def log_window(tr: Trainer, state: TrainState, meter: Meter, last: StepResult) -> None:
    """TensorBoard scalars and a log line for the window (collective), then a new window. The window
    was read back by the step (train_step at a read_due step)."""
    tc, step = tr.cfg.train, state.step
    loss_by_t = meter.loss_by_t()
    ranks = meter.ranks(tr.dev)
    now = time.perf_counter()
    img_s = (step - meter.first_step) * tc.global_batch / max(now - meter.started, 1e-9)
    achieved = img_s * tr.flops_per_example / tr.world  # per device
    if tr.mfu is None:
        from .perf import Mfu

        tr.mfu = Mfu(tr.compute.peak, tr.compute.peak_source)
    mfu, mfu_warning = tr.mfu(achieved)
    if tr.rank == 0:
        n = meter.steps
        loss = meter.loss / n
        me, (worst, slow) = ranks[0], slowest(ranks)
        tr.tb.scalars({"train/loss": loss, "train/lr": last.lr, "train/grad_norm": last.grad_norm,
                       "perf/images_per_sec": img_s, "perf/step_time": me["step_time"],
                       "perf/data_wait": me["data_wait"], "perf/tflops": achieved / 1e12, "perf/mfu": mfu,
                       "perf/memory_gb": me["memory_gb"], "perf/slowest_rank": worst,
                       "perf/slowest_step_time": slow["step_time"], "perf/slowest_data_wait": slow["data_wait"],
                       "perf/max_memory_gb": max(r["memory_gb"] for r in ranks),
                       "train/images_seen": state.images_seen,
                       "train/skipped_steps": state.skipped_total, "data/errors": tr.loader.stats["errors"],
                       **loss_by_t}, step)
        tr.tb.writer.add_text("perf/slowest_host", f"rank {worst} on {slow['host']}", step)
        eta = (tc.total_steps - step) * (now - meter.started) / max(step - meter.first_step, 1)
        log0(tr.rank, f"step {step}/{tc.total_steps} loss {loss:.4f} lr {last.lr:.2e} {img_s:.1f} img/s "
                      f"mfu {mfu:.1%} data-wait {me['data_wait']:.3f}s mem {me['memory_gb']:.2f}GB eta {_hms(eta)}"
                      + (f" data-errors {tr.loader.stats['errors']}" if tr.loader.stats["errors"] else "")
                      + (f" | slowest rank {worst} ({slow['host']}) step {slow['step_time']:.3f}s data-wait "
                         f"{slow['data_wait']:.3f}s mem {slow['memory_gb']:.2f}GB" if tr.world > 1 else ""))
        for warning in (mfu_warning, tr.loss_watch.check(step, loss)):
            if warning:
                log0(tr.rank, warning)
        tr.train_log.flush()
    meter.reset(step, now)


def maybe_save(tr: Trainer, state: TrainState, state_now: bool = False) -> None:
    """What falls due at this step: the TensorBoard sample grid, the EMA snapshot, the full training
    state (also when state_now: the job is about to be preempted). The EMA is gathered once for all
    three (collective under ZeRO-3: every rank takes part). Only the gather and DeepSpeed's local
    save hold the ranks; rank 0 writes the snapshot and finishes the state (upload, COMPLETE,
    retention) in tr.background while training goes on. A background job that failed stops the run
    here, at the next step; the final save (and a preemption's) waits for it."""
    from .checkpoint import save_state

    tc, step = tr.cfg.train, state.step
    if tr.rank == 0:
        tr.background.check()
    final = step == tc.total_steps
    want_samples = bool(tc.sample_every) and (step % tc.sample_every == 0 or final)
    want_snapshot = step % tc.snapshot_every == 0 or final
    want_state = step % tc.state_every == 0 or final or state_now
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
    jobs = []
    if tr.rank == 0 and want_snapshot:
        jobs.append(lambda: rundir.write_snapshot(tc.run_dir, step, ema_full, tr.cfg, meta))
        jobs.append(lambda: storage.retry(lambda: rundir.prune_snapshots(tr.cfg),  # keeps what is not scored yet
                                          f"pruning {storage.join(tc.run_dir, 'snapshots')}"))
    if tr.rank == 0 and (jobs or want_state):
        tr.background.wait()  # one in flight: the previous save is finished before this one starts
    if want_state:
        tr.train_log.flush()  # the rows up to this step outlive the job with the state (buffered on a bucket)
        finish = save_state(tr.engine, tr.cfg, step, ema_full, tr.loader.state_dict(),
                            {**meta, "optimizer_groups": tr.groups})
        jobs += [finish] if finish else []
    if jobs:
        tr.background.submit(jobs)
    if tr.rank == 0 and (final or state_now):  # the job ends after this save: its upload must finish
        tr.background.wait()
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
        """The sample grid, from one sampling pass that also records the routing of the first 2
        noises (routing() returns it). train.sample_steps > 0: that many DDIM steps under bf16
        autocast where the device has bf16 (rank 0 samples while the other ranks wait at the next
        collective: the preset's own sampler, 1,000 fp32 DDPM steps on imagenet, would hold every
        GPU for tens of seconds); 0: the snapshot's sampler (diffusion.sampler, sample_steps), fp32."""
        from .routing import render, sample_with_routing
        from .tblog import sample_grid

        self.model.load_state_dict(ema_state)
        labels = self.labels.to(self.dev) if self.labels is not None else None
        cond = self.cond.to(self.dev) if self.cond is not None else None
        k = min(2, self.noise.shape[0])
        steps, sampler, autocast = self.sampler()
        with autocast:
            x, records = sample_with_routing(self.model, self.noise.to(self.dev), self.cfg.diffusion, labels, cond,
                                             steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(0),
                                             keep=k)
        x = x.float()
        cond_cpu = cond.float().cpu() if cond is not None else None
        arr = render(self.model.cfg, x[:k], records, cond=cond_cpu[:k] if cond_cpu is not None else None,
                     write="cond", panel=96, labels=labels[:k].cpu() if labels is not None else None)
        self._routing = (torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0, records)
        if cond_cpu is not None:  # show the given frames before the predicted ones
            x = torch.cat([cond_cpu, x], dim=2)
        return sample_grid(x, nrow=self.cfg.model.num_classes or 0)

    def sampler(self):
        """(steps, sampler, autocast context) of the preview (train.sample_steps)."""
        import contextlib

        n = self.cfg.train.sample_steps
        if not n:
            return self.cfg.diffusion.sample_steps, self.cfg.diffusion.sampler, contextlib.nullcontext()
        bf16 = torch.cuda.is_bf16_supported() if self.dev.type == "cuda" else bool(_native_bf16())
        return n, "ddim", torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=bf16)

    def routing(self, records: list) -> torch.Tensor:
        """Where the latents read and write (rin_scale.routing) for the first 2 fixed noises, recorded
        by grid()'s pass. Fills `records` for routing_scalars."""
        image, recs = self._routing
        records.extend(recs)
        return image


def _native_bf16():
    from .perf import native_cpu_bf16

    return native_cpu_bf16()


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


class TrainLog:
    """RUN/train_log.jsonl from rank 0: one JSON line per step (step, loss, lr, images_seen, ...).
    A local file is appended at every step. On a bucket each flush (log lines and state saves) writes
    the rows since the last one as one new object, RUN/train_log.parts/FIRST-LAST.jsonl (their steps):
    a flush costs the same at step 150,000 as at step 100 (storage.append_jsonl).
    On resume, lines past the resumed step (work lost with the killed job) are dropped: on a bucket
    only the parts that hold such steps are touched."""

    def __init__(self, run: str, rank: int, resume_step: int):
        self.url, self.rank, self.pending = storage.join(run, "train_log.jsonl"), rank, []
        if rank != 0:
            return
        if storage.is_local(self.url) or storage.exists(self.url):  # a bucket's from an older version too
            self._drop_past(self.url, resume_step, always=storage.is_local(self.url))
        for part in storage.jsonl_parts(self.url):
            first, last = (int(x) for x in part.rsplit("/", 1)[1][:-len(".jsonl")].split("-"))
            if first > resume_step:
                storage.remove(part)
            elif last > resume_step:
                self._drop_past(part, resume_step)

    def append(self, row: dict) -> None:
        if self.rank != 0:
            return
        self.pending.append(row)
        if storage.is_local(self.url):
            self.flush()

    def flush(self) -> None:
        if self.rank != 0 or not self.pending:
            return
        if storage.is_local(self.url):  # every step: no fsync (a cluster filesystem's costs milliseconds)
            with open(storage.local_path(self.url), "a") as f:
                f.write(_jsonl(self.pending))
        else:
            steps = [r.get("step", 0) for r in self.pending]
            storage.append_jsonl(self.url, self.pending, part=f"{min(steps):012d}-{max(steps):012d}")
        self.pending = []

    @staticmethod
    def _drop_past(url: str, step: int, always: bool = False) -> None:
        """Rewrite one file or part without its rows past `step` (when it has any, or `always`)."""
        try:
            rows = storage.parse_jsonl(storage.read_bytes(url))
        except FileNotFoundError:
            rows = []
        kept = [r for r in rows if r.get("step", 0) <= step]
        if always or len(kept) < len(rows):
            storage.write_bytes(url, _jsonl(kept).encode())


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


if __name__ == "__main__":
    sys.exit(main())
