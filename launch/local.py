"""Local multi-process jobs (submitit's LocalExecutor) that can be preempted like SLURM jobs.

submitit 1.5's local controller does not handle the preemption signal: `job._interrupt()` kills
the controller and leaves its tasks running, so nothing is requeued. Here the controller forwards
the signal to every task, as SLURM does, and submitit's own requeue path (exit code 144, the
controller restarts the tasks from the re-dumped pickle) takes over. And as srun's
--kill-on-bad-exit does, a task that exits with an error ends the others (after PEER_GRACE_S, for
their own last lines): submitit's controller would wait for a hung peer for ever.

Run as `python -m launch.local FOLDER` (the controller process; started by the executor).
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE, Controller, LocalExecutor, LocalJob, LocalJobEnvironment


# as long as SLURM's default KillWait: a peer in a broken collective notices, says so and requeues
PEER_GRACE_S = float(os.environ.get("RIN_PEER_GRACE_S", "30"))


class ForwardingController(Controller):
    """submitit's controller, plus: the preemption signal is passed on to every task, and one task
    that fails ends the job."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        signal.signal(LocalJobEnvironment._usr_sig(), self._forward_signal)

    def wait(self, freq: int = 24) -> tp.Sequence[tp.Optional[int]]:
        """submitit's wait (the time-limit signal signal_delay_s before the limit), plus: once a task
        failed, the others get PEER_GRACE_S, then run() kills them (and requeues if one asked)."""
        now = time.monotonic()
        almost, end = now + self.timeout_s - self.signal_delay_s, now + self.timeout_s
        signalled, failed_at = False, None
        while now < end:
            codes = [t.poll() for t in self.tasks]
            if all(c is not None for c in codes):
                return codes
            if LOCAL_REQUEUE_RETURN_CODE in codes:
                return codes  # a task requeued the job: the others need no grace
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = now
            if failed_at is not None and now - failed_at > PEER_GRACE_S:
                return codes
            if not signalled and now >= almost:
                self._forward_signal(LocalJobEnvironment._usr_sig())
                signalled = True
            time.sleep(1.0 / freq)
            now = time.monotonic()
        return [t.poll() for t in self.tasks]


class PreemptibleLocalExecutor(LocalExecutor):
    """LocalExecutor whose jobs requeue on `job._interrupt()` or on their time limit."""

    def _submit_command(self, command: str) -> LocalJob:
        p = self.parameters
        ntasks = p.get("tasks_per_node", 1)
        n_gpus = p.get("gpus_per_node", 0)
        visible = p.get("visible_gpus", ())
        gpus = range(n_gpus) if visible == () else visible[:n_gpus]
        env = dict(os.environ)
        env.update(
            SUBMITIT_LOCAL_NTASKS=str(ntasks),
            SUBMITIT_LOCAL_COMMAND=command,
            SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * p.get("timeout_min", 2.0))),
            SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(p.get("signal_delay_s", 30))),
            SUBMITIT_LOCAL_NODEID="0",
            SUBMITIT_LOCAL_JOB_NUM_NODES="1",
            SUBMITIT_STDERR_TO_STDOUT="1" if p.get("stderr_to_stdout", False) else "",
            SUBMITIT_EXECUTOR="local",
            CUDA_VISIBLE_DEVICES=",".join(str(k) for k in gpus),
            # `exec` below keeps the controller's pid the job id, so no shell pid juggling
            SUBMITIT_LOCAL_WITH_SHELL="",
        )
        cmd = [sys.executable, "-m", "launch.local", str(self.folder)]
        setup = list(p.get("setup", ()))
        if setup:
            process = subprocess.Popen(" && ".join(setup + ["exec " + shlex.join(cmd)]), shell=True, env=env)
        else:
            process = subprocess.Popen(cmd, env=env)
        return LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))


def main(argv: tp.Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m launch.local SUBMITIT_FOLDER")
    ForwardingController(Path(argv[0])).run()


if __name__ == "__main__":
    main()
