"""One trainer per run directory (rin_scale.lease): RUN/lease.json on a local folder and on a real
GCS server (fake-gcs-server: the same gcsfs calls and ifGenerationMatch preconditions), then two real
trainers on one run, where the second refuses in one line."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from rin_scale import lease as L
from rin_scale import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "gcs"])
def run(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("gcs_bucket") + "/run"


def _holder(**kw) -> dict:
    """A lease body as another trainer would have written it (fresh, on another host, by default)."""
    now = time.time()
    body = {"host": "elsewhere", "boot_id": "x", "pidns": "pid:[1]", "pid": 4242, "pid_start": "1",
            "launcher_pid": 4241, "job": "", "attempt": 0, "owner": "elsewhere-4242-abcd", "since": now - 60,
            "time": now, "heartbeat_s": 30.0, "stale_after_s": 120.0, "write": "w1"}
    body.update(kw)
    return body


def _plant(run, body) -> None:
    storage.write_bytes(storage.join(run, L.LEASE_NAME), json.dumps(body).encode())


def _read(run) -> dict:
    return storage.read_json(storage.join(run, L.LEASE_NAME))


def _exists(run) -> bool:
    fs, path = storage.fs_path(storage.join(run, L.LEASE_NAME))
    fs.invalidate_cache()
    return fs.exists(path)


def test_taken_renewed_refused_and_released(run):
    a = L.Lease(run, heartbeat=0.2)
    assert a.acquire() == ""
    held = _read(run)
    me = L.identity()
    assert (held["host"], held["pid"], held["owner"]) == (me["host"], os.getpid(), a.owner)
    assert held["since"] <= held["time"] and held["stale_after_s"] == pytest.approx(0.8)

    # a second trainer (another Lease; this process's own holds count as alive) refuses in one line
    with pytest.raises(L.LeaseHeld) as e:
        L.Lease(run).acquire()
    msg = str(e.value)
    assert "\n" not in msg and "in use by another trainer" in msg and f"pid {os.getpid()}" in msg
    assert "holding it since" in msg and "delete" in msg and L.LEASE_NAME in msg

    # the heartbeat thread renews it; `since` stays
    a.start()
    t0 = held["time"]
    deadline = time.time() + 10
    while _read(run)["time"] == t0 and time.time() < deadline:
        time.sleep(0.05)
    renewed = _read(run)
    assert renewed["time"] > t0 and renewed["since"] == held["since"] and not a.lost.is_set()

    assert a.release() and not _exists(run)
    assert not a.release()  # once
    b = L.Lease(run)
    assert b.acquire() == "" and b.release()


def test_stale_lease_is_taken_over(run):
    _plant(run, _holder(time=time.time() - 1000))
    a = L.Lease(run)
    why = a.acquire()
    assert "no heartbeat for" in why and "stale after 120 s" in why
    assert _read(run)["owner"] == a.owner
    a.release()


def test_fresh_lease_of_another_host_is_refused_until_stale(run):
    _plant(run, _holder(time=time.time() - 100))  # 100 s < the holder's own 120 s
    with pytest.raises(L.LeaseHeld) as e:
        L.Lease(run, heartbeat=1).acquire()  # the taker's own, shorter, period does not count
    assert "host elsewhere pid 4242 (launcher pid 4241)" in str(e.value) and "last heartbeat 100 s ago" in str(e.value)
    assert _read(run)["owner"] == "elsewhere-4242-abcd"  # untouched


def test_dead_pid_on_this_host_is_taken_over_at_once(run):
    me = L.machine()
    live = subprocess.Popen(["sleep", "60"])
    try:
        start = L._start_ticks(live.pid)
        _plant(run, _holder(**me, pid=live.pid, pid_start=start))  # fresh heartbeat, live process
        with pytest.raises(L.LeaseHeld):
            L.Lease(run).acquire()
    finally:
        live.kill()
        live.wait()
    a = L.Lease(run)
    why = a.acquire()  # same holder, fresh heartbeat, process gone
    assert f"its process {live.pid} on {me['host']} is gone" in why
    a.release()

    # a pid now used by another process (its start time differs) is gone too
    _plant(run, _holder(**me, pid=os.getppid(), pid_start="1"))
    a = L.Lease(run)
    assert "the pid is another process's now" in a.acquire()
    a.release()


def test_an_earlier_attempt_of_the_same_job_is_taken_over_at_once(run, monkeypatch):
    _plant(run, _holder(job="777", attempt=0))
    monkeypatch.setenv("RIN_JOB_ID", "777")
    monkeypatch.setenv("RIN_JOB_ATTEMPT", "0")
    with pytest.raises(L.LeaseHeld):  # the same attempt elsewhere: another trainer of this job, alive
        L.Lease(run).acquire()
    monkeypatch.setenv("RIN_JOB_ATTEMPT", "1")
    a = L.Lease(run)
    assert "held by attempt 0 of this job 777 (this is attempt 1)" in a.acquire()
    assert (_read(run)["job"], _read(run)["attempt"]) == ("777", 1)
    a.release()


def test_a_restart_slurm_made_by_itself_is_a_later_attempt(run, monkeypatch):
    # submitit's pickle says attempt 1; SLURM restarted the job on its own (a lost node): its
    # restart count is the later attempt, and takes over attempt 1's lease at once
    _plant(run, _holder(job="778", attempt=1))
    monkeypatch.setenv("RIN_JOB_ID", "778")
    monkeypatch.setenv("RIN_JOB_ATTEMPT", "1")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    a = L.Lease(run)
    assert "held by attempt 1 of this job 778 (this is attempt 2)" in a.acquire()
    a.release()


def test_unreadable_lease_waits_until_old(run, tmp_path):
    url = storage.join(run, L.LEASE_NAME)
    storage.write_bytes(url, b"{not json")
    with pytest.raises(L.LeaseHeld) as e:
        L.Lease(run).acquire()
    assert "being written by another trainer (or is damaged" in str(e.value)
    if storage.is_local(run):
        os.utime(storage.local_path(url), (time.time() - 1000, time.time() - 1000))
        a = L.Lease(run)
        assert "unreadable" in a.acquire()
        a.release()


def test_a_holder_whose_lease_was_taken_over_learns_it(run):
    a = L.Lease(run, heartbeat=0.1)
    a.acquire()
    # Another trainer judged it stale (a long stall) and took it over.
    store = L._store(storage.join(run, L.LEASE_NAME))
    assert store.replace(json.dumps(_holder(owner="other-trainer")).encode(), store.read()[1]) is not None
    a.start()
    assert a.lost.wait(10), "the heartbeat did not notice"
    assert "taken over by host elsewhere pid 4242" in a.lost_reason
    assert not a.release() and _read(run)["owner"] == "other-trainer"  # not ours to delete


def test_racing_takers_of_a_stale_lease_have_one_winner(run):
    rounds = 6 if storage.is_local(run) else 3
    for _ in range(rounds):
        _plant(run, _holder(time=time.time() - 1000))
        n = 6
        leases = [L.Lease(run) for _ in range(n)]
        go = threading.Barrier(n)
        won, refused, errors = [], [], []

        def take(lease):
            go.wait()
            try:
                lease.acquire()
                won.append(lease)
            except L.LeaseHeld:
                refused.append(lease)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=take, args=(x,)) for x in leases]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(won) == 1 and len(refused) == n - 1, (len(won), len(refused))
        assert _read(run)["owner"] == won[0].owner
        assert won[0].release()
    if storage.is_local(run):  # no temporary or set-aside files left behind
        assert os.listdir(storage.local_path(run)) == []


# --------------------------------------------------------------------------------------------
# Two real trainers on one run

SMALL = ["model.latent_dim=64", "model.interface_dim=64", "model.latent_heads=4", "model.read_write_heads=4",
         "model.num_latents=16", "data.workers=0", "diffusion.sample_steps=4", "train.sample_count=4",
         "train.global_batch=8", "train.sample_every=0", "train.warmup_steps=2", "train.log_every=5"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "digits")
    subprocess.run([sys.executable, "-m", "data_tools.shard", "--embedded", "digits", "--split", "train", "--quiet",
                    out], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": ROOT})
    return out


def _cmd(run, shards, nproc, *overrides):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return launcher + ["-m", "rin_scale.train", "tiny", f"data.shards={shards}", f"train.run_dir={run}", *SMALL,
                       *overrides]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _steps(run):
    return [r["step"] for r in storage.read_jsonl(storage.join(run, "train_log.jsonl"))]


def _wait(cond, timeout, what, proc=None):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline or (proc is not None and proc.poll() is not None):
            out = open(proc.args_log).read()[-4000:] if proc is not None and hasattr(proc, "args_log") else ""
            raise AssertionError(f"no {what} (trainer exit {proc.poll() if proc else None})\n{out}")
        time.sleep(0.2)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.timeout(900)
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_second_trainer_on_a_running_run_refuses_in_one_line(shards, tmp_path, where, request):
    from rin_scale import rundir

    if where == "local":
        run, nproc, extra = str(tmp_path / "run"), 2, []
    else:  # one process each (2 CPU cores); DeepSpeed writes states to a local folder first
        run, nproc = request.getfixturevalue("gcs_bucket") + "/run", 1
        extra = [f"train.state_dir={tmp_path / 'states'}"]
    # ZeRO-0: the 2-rank state resumes in 1 process below without a conversion
    args = [*extra, "train.zero_stage=0", "train.total_steps=100000", "train.state_every=10", "train.snapshot_every=10"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(_cmd(run, shards, nproc, *args), cwd=ROOT, env=_env(), stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    first.args_log = str(log)
    try:
        _wait(lambda: rundir.newest_complete(run, "states") is not None, 400, "first state", first)
        held = _read(run)
        if nproc > 1:  # rank 0 holds it, and names its launcher
            assert held["pid"] != first.pid and held["launcher_pid"] == first.pid, held
        else:
            assert held["pid"] == first.pid
        config = storage.read_bytes(storage.join(run, "config.yaml"))

        # The same command again, while the first trains: refused before writing anything.
        second = subprocess.run(_cmd(run, shards, 1, *args), cwd=ROOT, env=_env(), capture_output=True,
                                text=True, timeout=300)
        assert second.returncode != 0, second.stdout[-2000:]
        lines = [x for x in second.stderr.splitlines() if "in use by another trainer" in x]
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        line = lines[0]
        assert line.startswith("[train] stopped: ") and f"pid {held['pid']}" in line and held["host"] in line
        assert "holding it since" in line and "delete" in line, line
        assert "rank(s) on" not in second.stdout  # it stopped before building anything
        assert first.poll() is None, "the first trainer died"
        assert _read(run)["owner"] == held["owner"]  # the lease is still the first trainer's
        assert storage.read_bytes(storage.join(run, "config.yaml")) == config
    finally:
        os.killpg(first.pid, 9)  # the launcher only: its ranks (own sessions) notice and exit
        first.wait()
    deadline = time.time() + 30
    while not _gone(held["pid"]) and time.time() < deadline:
        time.sleep(0.2)
    assert _gone(held["pid"]), "rank 0 outlived its launcher"
    steps = _steps(run)
    assert steps == list(range(1, len(steps) + 1)), steps  # each step once, in order
    if nproc > 1:  # the ranks left in one line each, and rank 0 released the lease on its way out
        gone = f"its launcher (pid {first.pid}) is gone"
        deadline = time.time() + 30  # each rank looks every LAUNCHER_CHECK_S: rank 1 may leave after rank 0
        while open(log).read().count(gone) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert open(log).read().count(gone) == 2, open(log).read()[-3000:]
        assert not _exists(run)
    else:  # a lone process killed: its lease stays behind
        assert _read(run)["owner"] == held["owner"]

    # The re-run (this host, rank 0 gone): takes the lease (over at once), resumes, finishes, releases.
    last = rundir.newest_complete(run, "states")[0]
    args[args.index("train.total_steps=100000")] = f"train.total_steps={last + 2}"
    third = subprocess.run(_cmd(run, shards, 1, *args), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert (f"its process {held['pid']} on {held['host']} is gone" in third.stdout) == (nproc == 1), third.stdout[-2000:]
    assert f"at step {last} " in third.stdout
    assert _steps(run) == list(range(1, last + 3))
    assert not _exists(run)


@pytest.mark.timeout(300)
def test_trainer_takes_over_a_stale_lease_and_a_dead_ranks_lease(shards, tmp_path):
    run = str(tmp_path / "run")
    _plant(run, _holder(time=time.time() - 1000))
    args = ["train.zero_stage=0", "train.state_every=2", "train.snapshot_every=2", "train.total_steps=2"]
    p = subprocess.run(_cmd(run, shards, 1, *args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "took over the lease on" in p.stdout and "no heartbeat for" in p.stdout, p.stdout[-2000:]
    assert _steps(run) == [1, 2] and not _exists(run)

    # a rank 0 killed on this host (fresh heartbeat, process gone): taken over at once
    dead = subprocess.Popen(["true"])
    dead.wait()
    _plant(run, _holder(**L.machine(), pid=dead.pid, pid_start="1"))
    p = subprocess.run(_cmd(run, shards, 1, *args[:-1], "train.total_steps=4"), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"its process {dead.pid} on" in p.stdout and "at step 2 " in p.stdout, p.stdout[-2000:]
    assert _steps(run) == [1, 2, 3, 4] and not _exists(run)


def test_a_zombie_holder_is_gone(tmp_path):
    run = str(tmp_path / "run")
    z = subprocess.Popen(["true"])  # exited, not yet reaped: a zombie with its pid and start time
    deadline = time.time() + 10
    while L._proc_state(z.pid) != "Z" and time.time() < deadline:
        time.sleep(0.05)
    try:
        _plant(run, _holder(**L.machine(), pid=z.pid, pid_start=L._start_ticks(z.pid)))
        a = L.Lease(run)
        assert f"its process {z.pid}" in a.acquire()
        a.release()
    finally:
        z.wait()
