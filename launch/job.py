"""The job function submitit runs on every task, and the run's launch log (RUN/launch.jsonl).

`TrainJob(argv, run_dir)` exports the distributed environment DeepSpeed expects and calls
`rin_scale.train.main(argv)` in-process; `EvalJob` does the same for `evals.service.main`.
It also exports RIN_JOB_ID and RIN_JOB_ATTEMPT (the requeues so far), which the trainer's lease on
the run records: a requeued attempt takes over the lease of an earlier attempt of its job at once.
On preemption or timeout submitit calls `checkpoint()` on global rank 0 inside its signal
handler: it only logs and returns the resubmission (the trainer saves states by itself, and a
collective save cannot run in a signal handler); the requeued job resumes from the newest
complete state.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import socket
import threading
import time
import typing as tp

import submitit
from submitit.core.utils import UncompletedJobError
from submitit.helpers import DelayedSubmission, TorchDistributedEnvironment

from rin_scale import storage

LOG_NAME = "launch.jsonl"
# Ranks other than 0 leave this long after the preemption signal if a broken collective has not
# ended them first (SLURM kills them on requeue; the local controller waits for every task).
FOLLOWER_GRACE_S = 30.0
# A task process unpickles its job (importing this module) right after it starts: the clock of
# this attempt, against which the time limit counts.
_PROCESS_START = time.time()


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

    def __call__(self):
        env = submitit.JobEnvironment()
        dist = TorchDistributedEnvironment()
        if self.master_addr:
            dist.master_addr = self.master_addr
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
        if not rank0:
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
            # a refused requeue was logged by checkpoint() already
            if rank0 and not isinstance(e, UncompletedJobError):
                log_event(self.run_dir, "failed", kind=self.kind, job_id=env.job_id,
                          error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise
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


def _job_id() -> str:
    try:
        return submitit.JobEnvironment().job_id
    except Exception:  # not inside a submitit job (called directly)
        return os.environ.get("SLURM_JOB_ID", "")


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
