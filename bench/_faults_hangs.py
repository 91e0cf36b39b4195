"""bench/faults.py part `hangs`: a rank or a data worker stopped (SIGSTOP), a rank killed, a
preemption, each in a 2-task submitit local job (python -m launch.submit --executor local --wait),
which must end within the watchdog's time plus a minute, requeue itself and resume exactly; and an
8-minute storage outage with the default deadlines, waited out without a collective timeout."""
from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time

from _faults_proc import alive, child_with_env, children, descendants

HANG_S = 30  # train.hang_timeout_s of the drills (the default, 900 s, would make each drill 15 minutes)
FAST = [f"train.hang_timeout_s={HANG_S}", "data.storage_retry_seconds=10", "train.collective_timeout_s=600"]
OUTAGE_S = 480
FAULTS = {"stop": "SIGSTOP of rank 1", "kill": "kill -9 of rank 1", "worker": "SIGSTOP of a DataLoader worker of rank 1",
          "preempt": "the scheduler's signal (SIGUSR2) to the job"}


def _rank(root: int, rank: int) -> int | None:
    """The task process of that rank: a child of the local controller (itself the submit process's
    child), found by submitit's task id."""
    for controller in children(root):
        pid = child_with_env(controller, "SUBMITIT_LOCAL_GLOBALID", str(rank))
        if pid is not None:
            return pid
    return None


def _step(view) -> int:
    return max([r.get("step", 0) for r in view.rows()] or [0])


def drill(suite, fault: str) -> None:
    from faults import COMMON, RunView, _jsonl

    run = suite.path("hangs", fault)
    shutil.rmtree(run, ignore_errors=True)
    view = RunView(run)
    job = suite.job(f"hangs-{fault}", ["-m", "launch.submit", "tiny", f"data.shards={suite.shards}",
                                       f"train.run_dir={run}", *COMMON, *FAST, "--executor", "local",
                                       "--tasks-per-node", "2", "--max-requeues", "2", "--requeue-backoff-s", "5",
                                       "--wait"])
    try:
        deadline = time.time() + 900
        while job.running() and _step(view) < 5 and time.time() < deadline:
            time.sleep(0.1)
        r0, r1 = _rank(job.proc.pid, 0), _rank(job.proc.pid, 1)
        if not job.running() or r0 is None or r1 is None:
            suite.record("hangs", fault, FAULTS[fault], "-", f"the job did not reach step 5 with both ranks "
                         f"(log {job.log_path})", False)
            return
        at = _step(view)
        target = {"stop": r1, "kill": r1, "worker": (children(r1) or [None])[0]}.get(fault)
        if fault == "preempt":
            target = children(job.proc.pid)[0]  # the local controller: it forwards the signal to every task
        sig = {"stop": signal.SIGSTOP, "worker": signal.SIGSTOP, "kill": signal.SIGKILL}.get(fault, signal.SIGUSR2)
        os.kill(target, sig)
        fired = time.time()
        peers_gone = None
        while job.running() and time.time() < fired + 900:
            if peers_gone is None and not alive(r0) and not alive(r1):
                peers_gone = time.time() - fired
            time.sleep(0.1)
        if job.running():
            job.kill()
        out = job.output()
    finally:
        job.close()
        for pid in descendants(job.proc.pid) if job.proc.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
    launch = _jsonl(os.path.join(run, "launch.jsonl"))
    requeues = [r for r in launch if r.get("event") == "requeued"]
    exact, why, _ = suite.compare_run(view, out)
    logs = os.path.join(run, "submitit", "train")
    text = "".join(open(os.path.join(logs, f)).read() for f in sorted(os.listdir(logs)) if f.endswith(
        ("_log.out", "_log.err"))) if os.path.isdir(logs) else ""
    parts = [f"attempt 1 ended {peers_gone:.0f} s after the fault" if peers_gone is not None
             else "attempt 1 never ended"]
    want = {"stop": "hang", "worker": "hang", "kill": "peer_lost", "preempt": "preempted"}[fault]
    ok = peers_gone is not None and peers_gone <= (60 if fault == "kill" else HANG_S + 60)
    parts.append(f"requeued: {[r.get('reason') for r in requeues]}")
    ok = ok and [r.get("reason") for r in requeues][:1] == [want]
    extra = {}
    if fault in ("stop", "worker"):
        dumps = sorted(os.listdir(os.path.join(run, "hangs"))) if os.path.isdir(os.path.join(run, "hangs")) else []
        why_line = requeues[0].get("why", "") if requeues else ""
        names = "rank 1 (host" in why_line if fault == "stop" else "DataLoader worker" in why_line or \
            "rank 1 (host" in why_line
        parts.append(f"{len(dumps)} stack dump(s) in RUN/hangs/, the line {'names' if names else 'does not name'} "
                     f"{'rank 1' if fault == 'stop' else 'the stopped worker or its rank'}")
        ok = ok and bool(dumps) and names
        extra["line"] = why_line
    if fault == "preempt":
        saved = [int(s) for s in re.findall(r"saved a state at step (\d+) on the scheduler's signal", text)]
        lost = max(0, at - saved[0]) if saved else None
        parts.append(f"signal after step {at}, state saved at step {saved[0] if saved else '?'}: {lost} step(s) lost")
        ok = ok and lost is not None and lost <= 1
        extra["lost_steps"] = lost
    parts.append("resume exact" if exact else f"resume NOT exact: {why}")
    suite.record("hangs", fault, FAULTS[fault], f"after step {at}", "; ".join(parts), ok and exact,
                 exact=exact, seconds_to_end=peers_gone, **extra)


def node_local(suite) -> None:
    """A node-local train.state_dir (one folder per node, by SLURMD_NODENAME) on a 2-node SLURM
    cluster on loopback (tests/slurm/slurm_up.sh): the job must stop at start-up with one line that
    names the node and its folder, and not requeue (a config error)."""
    import fcntl
    import subprocess
    import sys

    from faults import COMMON, _jsonl

    run, slurm = suite.path("hangs", "node-local"), suite.path("slurm")
    shutil.rmtree(run, ignore_errors=True)
    fault = "train.state_dir on node-local scratch (scratch-${SLURMD_NODENAME}), 2-node SLURM job"
    with open("/tmp/slurm.lock", "w") as lock:  # the cluster's ports are fixed: one at a time on this machine
        fcntl.flock(lock, fcntl.LOCK_EX)
        up = subprocess.run(["bash", os.path.join(suite.repo, "tests", "slurm", "slurm_up.sh"), slurm, "2"],
                            capture_output=True, text=True, timeout=600)
        env = {**suite.env, "SLURM_CONF": os.path.join(slurm, "slurm.conf"),
               "PATH": os.path.join(slurm, "bin") + os.pathsep + os.environ["PATH"]}
        try:
            if up.returncode != 0:
                suite.record("hangs", "node-local", fault, "start-up", f"SLURM did not come up: {up.stderr[-300:]}", False)
                return
            t0 = time.time()
            sub = subprocess.run([sys.executable, "-m", "launch.submit", "tiny", f"data.shards={suite.shards}",
                                  f"train.run_dir={run}", f"train.state_dir={run}-scratch-${{oc.env:SLURMD_NODENAME,submit}}",
                                  *COMMON, "--executor", "slurm", "--nodes", "2", "--tasks-per-node", "1",
                                  "--time-min", "20", "--master-addr", "127.0.0.1", "--folder", os.path.join(run, "submitit")],
                                 cwd=suite.repo, env=env, capture_output=True, text=True, timeout=300)
            ended = []
            while sub.returncode == 0 and not ended and time.time() < t0 + 600:
                time.sleep(1)
                launch = _jsonl(os.path.join(run, "launch.jsonl"))
                ended = [r for r in launch if r.get("event") in ("finished", "failed", "requeued")]
        finally:
            subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=30)
            time.sleep(2)
            subprocess.run(["bash", os.path.join(suite.repo, "tests", "slurm", "slurm_down.sh"), slurm], timeout=60)
    events = [r.get("event") for r in _jsonl(os.path.join(run, "launch.jsonl"))]
    why = ended[0].get("error", "") if ended else ""
    ok = events == ["submitted", "started", "failed"] and "is not shared by all ranks" in why and \
        "rank 1 on node2" in why and not os.path.exists(os.path.join(run, "train_log.jsonl"))
    outcome = (f"stopped {time.time() - t0:.0f} s after submission, before step 1; events {events}; "
               f"the line: `{why[:160]}...`") if ended else f"no end within 10 minutes ({sub.stderr[-300:]})"
    suite.record("hangs", "node-local", fault, "start-up", outcome, ok)


def part(suite) -> dict:
    suite.baseline()
    outage = threading.Thread(target=suite.outage_trial, args=("stream", OUTAGE_S), daemon=True)
    outage.start()  # it mostly waits: beside the other drills
    for fault in ("stop", "kill", "worker", "preempt"):
        drill(suite, fault)
    node_local(suite)
    outage.join()
    for t in suite.trials:  # the outage's row belongs to this part's table
        if t["part"] == "outage" and t["trial"].endswith(f"-{OUTAGE_S}s"):
            t["part"], t["trial"] = "hangs", f"outage {OUTAGE_S // 60} min, default deadlines"
    rows = [t for t in suite.trials if t["part"] == "hangs"]
    what = (f"2-task local submitit jobs (train.hang_timeout_s={HANG_S}): {'; '.join(FAULTS.values())}, each after "
            f"step 5: the job must end within the watchdog's time + 60 s (a killed rank's peer: 60 s), requeue "
            f"itself and resume exactly; a node-local train.state_dir on a 2-node SLURM job: one line at "
            f"start-up, no requeue; and gs:// shards unreachable for {OUTAGE_S // 60} min with the default "
            f"deadlines: waited out, no collective timeout")
    return {"what": what, "exact resumes": f"{sum(1 for t in rows if t.get('exact'))} of {len(rows)}",
            "ok": bool(rows) and all(t["ok"] for t in rows)}
