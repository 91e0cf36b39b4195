"""A hung or crashed rank ends the job, says where it hung, and the job comes back by itself
(issue 42): real DeepSpeed on 2 gloo processes, under launch.torchrun (the project's wrapper of
torchrun) and as a submitit local job; a rank stopped with SIGSTOP, as a stuck collective, a dead
NFS mount or a GPU that stops answering leave it. Short watchdog settings keep the tests short."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from launch import job as launch_job
from launch import submit as launch_submit
from rin_scale import rundir, storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from _faults_proc import child_with_env  # noqa: E402 - the drills' own way to find a rank
SMALL = ["model.latent_dim=64", "model.interface_dim=64", "model.latent_heads=4", "model.read_write_heads=4",
         "model.num_latents=16", "data.workers=2", "diffusion.sample_steps=4", "train.sample_count=4",
         "train.zero_stage=2", "train.global_batch=8", "train.warmup_steps=2", "train.sample_every=0",
         "train.log_every=2"]
# a rank with no progress for 20 s is hung; outages are waited out for 5 s; collectives wait 10 min
FAST_WATCHDOG = ["train.hang_timeout_s=20", "data.storage_retry_seconds=5", "train.collective_timeout_s=600"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_tools import shard

    out = str(tmp_path_factory.mktemp("digits"))
    assert shard.main(["--embedded", "digits", "--split", "train", out, "--workers", "1", "--quiet"]) == 0
    return out


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _rows(run):
    return [r for r in storage.read_jsonl(storage.join(run, "train_log.jsonl")) if "step" in r]


def _last(run):
    return max([r["step"] for r in _rows(run)] or [0])


def _wait_for(cond, timeout, what):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _child_with(parent: int, var: str, value: str) -> int:
    """The child process of `parent` whose environment has var=value (a rank, found as a user would)."""
    pid = child_with_env(parent, var, value)
    assert pid is not None, f"no child of {parent} with {var}={value}"
    return pid


def test_a_bad_deadline_and_any_stop_are_the_last_line_under_launch_torchrun(shards, tmp_path):
    # the watchdog would call a storage outage the run waits out a hang: refused at start-up, in
    # one line, and that line is the last thing the user reads (not torchrun's ChildFailedError)
    cmd = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc_per_node=2", "-m", "rin_scale.train",
           "tiny", f"data.shards={shards}", f"train.run_dir={tmp_path / 'run'}", *SMALL,
           "train.hang_timeout_s=60", "data.storage_retry_seconds=120"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: train.hang_timeout_s=60 must exceed data.storage_retry_seconds=120"), \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    report = proc.stderr.strip().splitlines()[-2].split("torchrun's report: ")[1]
    assert "ChildFailedError" not in open(report).read() and "exitcode" in open(report).read()
    os.unlink(report)


def _submit(run, shards, total, *extra):
    return launch_submit.submit(["tiny", f"data.shards={shards}", f"train.run_dir={run}",
                                 f"train.total_steps={total}", *SMALL, *FAST_WATCHDOG, *extra,
                                 "--executor", "local", "--tasks-per-node", "2", "--max-requeues", "3",
                                 "--requeue-backoff-s", "1"])


@pytest.mark.timeout(1200)
def test_a_local_job_requeues_itself_after_a_hang_and_a_crash_and_saves_on_preemption(shards, tmp_path):
    # 32 steps: attempt 3 is signalled a few steps past its resume, and an idle machine trains the
    # rest of 16 steps (1-2 s) before the signal reaches the ranks: the job finished unpreempted.
    run, total = str(tmp_path / "run"), 32
    job = _submit(run, shards, total, "train.state_every=4", "train.snapshot_every=4")
    logs = os.path.join(run, "submitit", "train")

    def starts():
        return sum(1 for r in launch_job.read_log(run) if r["event"] == "started") if not job.done() else -1

    def rank(r):
        return _child_with(int(job.job_id), "SUBMITIT_LOCAL_GLOBALID", str(r))

    try:
        # attempt 1: rank 1 stopped once 5 steps are logged (a state at 4 or later): the job ends and requeues ("hang")
        _wait_for(lambda: len(_rows(run)) >= 5 or job.done(), 600, "five steps")
        os.kill(rank(1), signal.SIGSTOP)
        stopped = time.time()
        _wait_for(lambda: starts() in (2, -1), 20 + 60 + 30, "the requeued start")  # + a minute + the restart
        ended_s = min(r["time"] for r in launch_job.read_log(run) if r["event"] == "requeued") - stopped
        # attempt 2: rank 1 killed once it trained on: its peer leaves, the job requeues ("peer_lost").
        # Rows reach the log at log steps, so "trained on" is a row past the last one attempt 1 wrote
        # (the rows attempt 1 left past its state stay until attempt 2's start-up drops them).
        before = _last(run)
        _wait_for(lambda: _last(run) > before or job.done(), 600, "steps of attempt 2")
        peer = rank(0)
        os.kill(rank(1), signal.SIGKILL)
        killed = time.time()
        _wait_for(lambda: not os.path.exists(f"/proc/{peer}") or job.done(), 60, "the peer of the killed rank to end")
        peer_s = time.time() - killed
        _wait_for(lambda: starts() in (3, -1), 120, "the second requeued start")
        # attempt 3: preempted once it trained on: a state at the step the signal reached
        before = _last(run)
        _wait_for(lambda: _last(run) > before or job.done(), 600, "steps of attempt 3")
        at_signal = _last(run)
        job._interrupt()
        _wait_for(job.done, 600, "the job to finish")
    finally:
        if not job.done():
            job.cancel()
    assert job.results() == [0, 0]
    rows = launch_job.read_log(run)
    events = [(r["event"], r.get("reason")) for r in rows]
    assert events == [("submitted", None), ("started", None), ("requeued", "hang"), ("started", None),
                      ("requeued", "peer_lost"), ("started", None), ("requeued", "preempted"), ("started", None),
                      ("finished", None)], events
    assert ended_s < 20 + 60 and peer_s < 60
    # the hang: one line naming the silent rank, every thread's stack in RUN/hangs/
    why = rows[2]["why"]
    assert why.startswith("[train] rank 0 (host ") and "hung: no progress for" in why, why
    assert "rank 1 (host" in why and "silent for" in why and "stopped, or its host is lost" in why
    assert rows[2]["backoff_s"] == 1 and rows[4]["backoff_s"] == 2  # doubled for the second failure
    (dump,) = os.listdir(os.path.join(run, "hangs"))
    assert dump in why and "-rank-00000-" in dump
    text = open(os.path.join(run, "hangs", dump)).read()
    # every thread's stack, the main thread's in the training loop: in a step, a log window's
    # all-reduce or a save, whichever collective rank 0 was in when its peer stopped (machine speed)
    assert "silent for" in text and "Thread 0x" in text and "in _loop" in text, text
    assert re.search(r"line \d+ in (train_step|log_window|maybe_save)\n", text), text
    assert "a collective failed after step" in rows[4]["why"]
    # the preempted attempt saved at the step the signal reached: at most one step lost
    out = open(os.path.join(logs, f"{job.job_id}_0_log.out")).read() + \
        open(os.path.join(logs, f"{job.job_id}_0_log.err")).read()
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", out)]
    saved = [int(s) for s in re.findall(r"saved a state at step (\d+) on the scheduler's signal", out)]
    # attempt 2 resumed from the newest state before the hang (every 4 steps; which one depends on
    # how fast the machine reached the stop), attempt 4 from the preemption's own state
    assert len(resumed) == 3 and resumed[0] >= 4 and resumed[0] % 4 == 0 and len(saved) == 1 and resumed[2] == saved[0]
    assert at_signal <= saved[0] <= at_signal + 2  # the step under way when the signal came, or the next
    # every step once, the run complete
    assert [r["step"] for r in _rows(run)] == list(range(1, total + 1))
    assert rundir.newest_complete(run, "states")[0] == total
