"""The job function submitit runs on every task, and the run's launch log (RUN/launch.jsonl).

`TrainJob(argv, run_dir)` exports the distributed environment DeepSpeed expects and calls
`rin_scale.train.main(argv)` in-process; `EvalJob` does the same for `evals.service.main`.
It also exports RIN_JOB_ID and RIN_JOB_ATTEMPT (the requeues so far), which the trainer's lease on
the run records: a requeued attempt takes over the lease of an earlier attempt of its job at once.
A training job handles the scheduler's signal itself, on every rank: the signal only sets a flag
that the trainer's per-step all-reduce carries, every rank saves a state at that step's end, and
rank 0 then requeues the job (a collective save cannot run in a signal handler). The eval and
shard services keep submitit's way: `checkpoint()` on rank 0 logs and returns the resubmission.
A training job also requeues itself after a retryable failure (a hang, a collective that failed
because a peer crashed, stopped or lost its host: rin_scale.watchdog's exit statuses), with a
backoff, up to --max-requeues in all; the first rank to fail requeues it, once per attempt. A stop
that a requeue would repeat (a config error, bad data, a divergence, another trainer) ends the job.
RUN/launch.jsonl says which, and why.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as tp

import submitit
from submitit.core.utils import UncompletedJobError, temporary_save_path
from submitit.helpers import DelayedSubmission, TorchDistributedEnvironment
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

from rin_scale import storage
from rin_scale import watchdog
from rin_scale.watchdog import EXIT_CRASHED, EXIT_PREEMPTED, RETRYABLE, on_fatal

LOG_NAME = "launch.jsonl"
# Ranks other than 0 leave this long after the preemption signal if a broken collective has not
# ended them first (SLURM kills them on requeue; the local controller waits for every task).
FOLLOWER_GRACE_S = 30.0
# A task process unpickles its job (importing this module) right after it starts: the clock of
# this attempt, against which the time limit counts.
_PROCESS_START = time.time()
MAX_BACKOFF_S = 1800.0  # the longest wait before a requeued attempt after failures in a row


def log_url(run_dir: str) -> str:
    return storage.join(run_dir, LOG_NAME)


def log_event(run_dir: str, event: str, **fields) -> dict:
    """Append one row {time, event, ...} to RUN/launch.jsonl."""
    row = {"time": round(time.time(), 3), "event": event, **fields}
    storage.append_jsonl(log_url(run_dir), row)
    return row


def read_log(run_dir: str) -> list[dict]:
    return storage.read_jsonl(log_url(run_dir))


def _resolve(entry: tp.Union[str, tp.Callable]) -> tp.Callable:
    if callable(entry):
        return entry
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name or "main")


@dataclasses.dataclass
class LaunchJob:
    """A picklable job: `entry(argv)` on every task, with requeue on preemption.

    entry: "module:function" (or a callable) taking an argv list; run_dir: where launch.jsonl
    goes; max_requeues: requeues allowed in all (preemptions and timeouts); master_addr: overrides
    the first node's hostname (clusters whose node names do not resolve); timeout_min and
    signal_delay_s: the job's time limit and how long before it the signal comes, to tell a
    timeout from a preemption; requeues: how many times it came back so far.
    """

    entry: tp.Union[str, tp.Callable]
    argv: list
    run_dir: str
    kind: str = "train"
    max_requeues: int = 10
    master_addr: tp.Optional[str] = None
    timeout_min: float = 0.0
    signal_delay_s: int = 0
    requeues: int = 0
    backoff_s: float = 60.0  # before the first requeue after a failure; doubled for each failure after it
    failures: int = 0  # requeues after failures so far (preemptions and timeouts are not failures)
    start_after: float = 0.0  # a local requeue's backoff: its tasks wait until then (SLURM's queue waits instead)

    def __call__(self):
        env = submitit.JobEnvironment()
        if os.environ.get("SUBMITIT_EXECUTOR") == "local":
            time.sleep(max(0.0, self.start_after - time.time()))
        dist = TorchDistributedEnvironment()
        if self.master_addr:
            dist.master_addr = self.master_addr
        if "MASTER_PORT" not in os.environ:  # the user's own port, where set, is kept
            dist.master_port = master_port(env.job_id, self.requeues)
        # DeepSpeed picks the GPU by LOCAL_RANK: leave CUDA_VISIBLE_DEVICES with all of them.
        dist.export(set_cuda_visible_devices=False, overwrite=True)
        # The trainer's lease on the run names this job and attempt: a requeued attempt takes over
        # its earlier attempt's lease at once (rin_scale.lease), whatever executor runs it.
        os.environ["RIN_JOB_ID"] = str(env.job_id)
        os.environ["RIN_JOB_ATTEMPT"] = str(self.requeues)
        self._started = _PROCESS_START
        rank0 = dist.rank == 0
        # SLURM signals the whole process group: forked helpers (DataLoader workers) inherit
        # submitit's handler and would requeue the job a second time, so they ignore the signal.
        sig = env._usr_sig()
        os.register_at_fork(after_in_child=lambda: signal.signal(sig, signal.SIG_IGN))
        if self.kind == "train":
            _save_on_signal(sig)
            on_fatal(lambda status, line: self._after_failure(env, status, line))
        elif not rank0:
            _leave_on_preemption(env)
        if rank0:
            log_event(self.run_dir, "started", kind=self.kind, job_id=env.job_id, requeues=self.requeues,
                      world_size=dist.world_size, nodes=env.num_nodes, hosts=list(env.hostnames),
                      master=f"{dist.master_addr}:{dist.master_port}")
        try:
            rc = _resolve(self.entry)(list(self.argv))
        except SystemExit as e:
            if getattr(self, "_checkpointed", False):
                raise  # submitit leaving after a requeue, or a rank following rank 0
            rc = e.code  # the service's own exit, e.g. sys.exit("config error: ...")
        except Exception as e:
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if self.kind == "train":  # a crashed rank: retryable, with a backoff
                status = self._after_failure(env, EXIT_CRASHED, error)
                if status == LOCAL_REQUEUE_RETURN_CODE:
                    _leave(status)
            # a refused requeue was logged by checkpoint() already
            elif rank0 and not isinstance(e, UncompletedJobError):
                log_event(self.run_dir, "failed", kind=self.kind, job_id=env.job_id, error=error)
            raise
        if self.kind == "train" and rc in RETRYABLE:
            if rc == EXIT_PREEMPTED and not rank0:
                return None  # saved with every rank; rank 0 requeues
            _leave(self._after_failure(env, rc, ""))
        if rc not in (None, 0):
            why = rc if isinstance(rc, str) else f"exit status {rc}"
            if rank0:
                log_event(self.run_dir, "failed", kind=self.kind, job_id=env.job_id, error=why)
            raise RuntimeError(f"{self.kind} failed: {why}")
        if rank0:
            log_event(self.run_dir, "finished", kind=self.kind, job_id=env.job_id, requeues=self.requeues)
        return rc

    def checkpoint(self, *args, **kwargs) -> tp.Optional[DelayedSubmission]:
        """Called by submitit on rank 0 in the signal handler: log, enforce the cap, resubmit."""
        job_id = _job_id()
        reason = self._reason()
        self._checkpointed = True
        if self.requeues >= self.max_requeues:
            log_event(self.run_dir, "requeue_refused", kind=self.kind, job_id=job_id, reason=reason,
                      requeues=self.requeues, max_requeues=self.max_requeues)
            return None  # submitit ends the job ("checkpoint function returned None")
        nxt = dataclasses.replace(self, requeues=self.requeues + 1)
        log_event(self.run_dir, "requeued", kind=self.kind, job_id=job_id, reason=reason,
                  requeues=nxt.requeues, max_requeues=self.max_requeues, host=socket.gethostname())
        return DelayedSubmission(nxt)

    def _after_failure(self, env, status: int, line: str) -> int:
        """A retryable exit (rin_scale.watchdog): requeue the job once per attempt (the first rank to
        get here does), after a backoff for failures; returns the status this rank leaves with."""
        reason = self._reason() if status == EXIT_PREEMPTED else RETRYABLE[status]
        line = line or watchdog.last_line
        if not _first_to_requeue(env, self.requeues):
            return status
        job_id = str(env.job_id)
        if self.requeues >= self.max_requeues:
            log_event(self.run_dir, "requeue_refused", kind=self.kind, job_id=job_id, reason=reason, why=line,
                      requeues=self.requeues, max_requeues=self.max_requeues)
            return status
        failed = reason not in ("preempted", "timeout")
        wait = min(self.backoff_s * 2 ** self.failures, MAX_BACKOFF_S) if failed else 0.0
        nxt = dataclasses.replace(self, requeues=self.requeues + 1, failures=self.failures + int(failed),
                                  start_after=time.time() + wait)
        log_event(self.run_dir, "requeued", kind=self.kind, job_id=job_id, reason=reason, why=line,
                  requeues=nxt.requeues, max_requeues=self.max_requeues, backoff_s=wait, host=socket.gethostname())
        old = DelayedSubmission.load(env.paths.submitted_pickle)
        new = DelayedSubmission(nxt)
        new.set_timeout(old._timeout_min, old._timeout_countdown)
        with temporary_save_path(env.paths.submitted_pickle) as tmp:
            new.dump(tmp)
        if os.environ.get("SUBMITIT_EXECUTOR") == "local":
            return LOCAL_REQUEUE_RETURN_CODE  # the local controller starts the tasks again (they wait first)
        subprocess.run(["scontrol", "requeue", job_id], timeout=60, check=False)
        if wait:  # the requeued job waits in the queue, not on its nodes
            subprocess.run(["scontrol", "update", f"JobId={job_id}", f"StartTime=now+{int(wait)}"],
                           timeout=60, check=False, capture_output=True)
        return status

    def _reason(self) -> str:
        # The time-limit signal comes signal_delay_s before the limit (sbatch --signal, or the local
        # controller); anything earlier is a preemption. The slack covers the process start-up.
        started = getattr(self, "_started", None)
        if not self.timeout_min or started is None:
            return "preempted"
        limit = self.timeout_min * 60
        left = limit - (time.time() - started)
        return "timeout" if left <= self.signal_delay_s + min(60.0, 0.1 * limit) else "preempted"

    def __getstate__(self):
        # _started belongs to one attempt; the resubmission starts its own clock
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def TrainJob(argv: list, run_dir: str, **kw) -> LaunchJob:
    """`python -m rin_scale.train ARGV` as a job (ARGV should set train.run_dir=RUN)."""
    return LaunchJob("rin_scale.train:main", list(argv), run_dir, kind="train", **kw)


def EvalJob(argv: list, run_dir: str, **kw) -> LaunchJob:
    """`python -m evals.service --run RUN ARGV` as a job."""
    return LaunchJob("evals.service:main", ["--run", run_dir, *argv], run_dir, kind="eval", **kw)


def master_port(job_id, attempt: int) -> int:
    """The rendezvous port of one attempt of a job, the same on every task without talking: a
    hash of the job id and the attempt (own requeues plus SLURM's). submitit picks from 20000-60000
    by the job id alone, which overlaps Linux's ephemeral ports (32768-60999): a port an outgoing
    connection happened to hold failed every attempt of the job with EADDRINUSE. Here the ports
    stay below that range, and each requeue moves to another (a step of 7,919, coprime to the
    range's 12,768 ports, so no two of a job's first 12,768 attempts share one)."""
    import random

    attempt += int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
    return 20000 + (random.Random(str(job_id)).randrange(12768) + 7919 * attempt) % 12768


def _job_id() -> str:
    try:
        return submitit.JobEnvironment().job_id
    except Exception:  # not inside a submitit job (called directly)
        return os.environ.get("SLURM_JOB_ID", "")


def _leave(status: int) -> None:
    """Out with `status` at once: a process group broken by a lost peer can hang or abort in the
    interpreter's teardown, and the local controller requeues on the exact status only."""
    sys.stdout.flush()
    sys.stderr.flush()
    watchdog.leave(status)


def _first_to_requeue(env, attempt: int) -> bool:
    """Once per attempt among all ranks (every rank of a hung job may fire at once): a token file
    in submitit's folder, which every node shares. SLURM's own requeues count as attempts too."""
    name = f"requeue-{env.job_id}-{attempt}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    try:
        os.close(os.open(os.path.join(env.paths.folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


def _save_on_signal(sig) -> None:
    """The scheduler's signal (preemption, or the time limit near) on a training task: a flag the
    trainer's next all-reduce carries; every rank saves at that step's end and leaves with
    EXIT_PREEMPTED, then rank 0 requeues (LaunchJob._after_failure)."""
    from rin_scale.train import request_save_and_stop

    signal.signal(sig, lambda signum, frame: request_save_and_stop())


def _leave_on_preemption(env) -> None:
    """Non-zero ranks: on the preemption signal, exit after a grace period.

    Rank 0 requeues and exits; the other ranks normally fail at their next collective. SLURM
    would kill them on requeue, but the local controller waits for them, so make sure they go.
    """
    sig = env._usr_sig()
    previous = signal.getsignal(sig)

    def handler(signum, frame):
        if callable(previous):
            previous(signum, frame)
        timer = threading.Timer(FOLLOWER_GRACE_S, os._exit, args=(143,))
        timer.daemon = True
        timer.start()

    signal.signal(sig, handler)
