"""launch end to end with the real trainer: the tiny preset as a 2-task DeepSpeed ZeRO-2 job
(submitit LocalExecutor) preempted mid-run and requeued, and as a 2-node job on a real SLURM
cluster on loopback (Debian's slurmctld + slurmd, started and stopped here by pid file)."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from launch import job as launch_job
from launch import status as launch_status
from launch import submit as launch_submit
from rin_scale import rundir, storage

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# small enough to train in seconds on 2 CPU processes; the model is the tiny preset's
TINY = ["train.global_batch=8", "train.state_every=4", "train.snapshot_every=4", "train.sample_every=0",
        "train.log_every=4", "train.warmup_steps=2", "train.zero_stage=2", "data.workers=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_tools import shard

    out = str(tmp_path_factory.mktemp("digits"))
    assert shard.main(["--embedded", "digits", "--split", "train", out, "--workers", "1", "--quiet"]) == 0
    return out


def _wait_for(cond, timeout, what, log_dir=None):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            tail = ""
            if log_dir and os.path.isdir(log_dir):
                for f in sorted(os.listdir(log_dir)):
                    if f.endswith(("_0_log.out", "_0_log.err")):
                        tail += f"\n--- {f}\n" + open(os.path.join(log_dir, f)).read()[-3000:]
            raise AssertionError(f"timed out waiting for {what}{tail}")
        time.sleep(0.2)


def _steps(run):
    return [r for r in storage.read_jsonl(storage.join(run, "train_log.jsonl")) if "step" in r]


def test_preempted_local_zero2_job_requeues_and_finishes_from_its_last_state(shards, tmp_path, capsys):
    run, total = str(tmp_path / "run"), 16
    job = launch_submit.submit(["tiny", f"data.shards={shards}", f"train.run_dir={run}",
                                f"train.total_steps={total}", *TINY,
                                "--executor", "local", "--tasks-per-node", "2", "--max-requeues", "2"])
    logs = os.path.join(run, "submitit", "train")
    # preempt once the first complete state exists, while steps remain
    # (the first DeepSpeed start on a fresh machine also compiles its CPU comm op: minutes)
    _wait_for(lambda: rundir.newest_complete(run, "states") is not None or job.done(), 600,
              "the first state", logs)
    assert not job.done(), "the job ended before it could be preempted"
    job._interrupt()  # the signal SLURM sends on preemption, through the local controller
    _wait_for(job.done, 300, "the requeued job to finish", logs)
    assert job.results() == [0, 0]

    rows = launch_job.read_log(run)
    assert [r["event"] for r in rows] == ["submitted", "started", "requeued", "started", "finished"]
    assert rows[2]["reason"] == "preempted" and rows[2]["requeues"] == 1 and rows[3]["requeues"] == 1
    assert len({r["job_id"] for r in rows}) == 1
    # each attempt meets on its own port, below Linux's ephemeral range (a port some outgoing
    # connection held made every attempt of a job fail with EADDRINUSE)
    ports = [int(r["master"].rsplit(":", 1)[1]) for r in rows if r["event"] == "started"]
    assert ports[0] != ports[1] and all(20000 <= p < 32768 for p in ports), ports

    # the second attempt resumed from the state every rank saved at the step the signal reached
    out = open(os.path.join(logs, f"{job.job_id}_0_log.out")).read()
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", out)]
    saved = re.findall(r"saved a state at step (\d+) on the scheduler's signal", out + open(
        os.path.join(logs, f"{job.job_id}_0_log.err")).read())
    assert len(resumed) == 1 and 4 <= resumed[0] < total and saved == [str(resumed[0])]

    # every step logged exactly once, progress counted in images, nothing lost or repeated
    steps = _steps(run)
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    assert all(r["images_seen"] == r["step"] * 8 for r in steps)
    snap = rundir.newest_complete(run, "snapshots")
    meta = storage.read_json(storage.join(snap[1], "meta.json"))
    assert (meta["step"], meta["images_seen"]) == (total, total * 8)
    assert rundir.newest_complete(run, "states")[0] == total
    # one trainer at a time held the run: the requeued attempt took the lease (released by the
    # preempted one, or taken over as an earlier attempt of this job), and released it at the end
    assert "in use by another trainer" not in out
    assert not storage.exists(storage.join(run, "lease.json"))

    # launch.status reads all of it back
    capsys.readouterr()
    assert launch_status.main([run, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    (j,) = s["jobs"]
    assert (j["state"], j["requeues"], j["reasons"], j["executor"]) == ("COMPLETED", 1, ["preempted"], "local")
    assert s["progress"]["step"] == total and s["progress"]["images_seen"] == total * 8
    assert s["total_steps"] == total and s["newest_state"]["step"] == total
    assert launch_status.main([run]) == 0
    text = capsys.readouterr().out
    assert f"step: {total} / {total}" in text and "COMPLETED" in text and "starts 2  requeues 1 [preempted]" in text


def test_tiny_trains_as_a_2_node_slurm_job_running_the_dry_run_script(shards, slurm, tmp_path):
    run, total, folder = str(tmp_path / "run"), 4, str(tmp_path / "submitit")
    argv = ["tiny", f"data.shards={shards}", f"train.run_dir={run}", f"train.total_steps={total}", *TINY,
            "--executor", "slurm", "--nodes", "2", "--tasks-per-node", "1", "--time-min", "20",
            # loopback node names (node1, node2) do not resolve
            "--master-addr", "127.0.0.1", "--folder", folder]
    cli = [sys.executable, "-m", "launch.submit", *argv]
    sub = subprocess.run(cli, env=slurm, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    (submitted,) = [r for r in launch_job.read_log(run) if r["event"] == "submitted"]
    job_id = submitted["job_id"]
    logs = os.path.join(folder, "train")
    done = lambda: any(r["event"] in ("finished", "failed") for r in launch_job.read_log(run))  # noqa: E731
    _wait_for(done, 400, f"SLURM job {job_id}", logs)

    rows = launch_job.read_log(run)
    assert [r["event"] for r in rows] == ["submitted", "started", "finished"], rows
    started = rows[1]
    assert started["world_size"] == 2 and started["nodes"] == 2 and started["hosts"] == ["node1", "node2"]
    assert [r["step"] for r in _steps(run)] == list(range(1, total + 1))
    assert rundir.newest_complete(run, "snapshots")[0] == total

    # the script SLURM ran is exactly what --dry-run prints
    dry = subprocess.run(cli + ["--dry-run"], env=slurm, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    printed = dry.stdout.split("# ---- sbatch script ----\n", 1)[1].split("# ---- resolved config ----")[0]
    ran = open(os.path.join(logs, f"{job_id}_submission.sh")).read()
    assert printed.rstrip("\n") == ran.rstrip("\n")
    assert "#SBATCH --nodes=2" in ran and "#SBATCH --ntasks-per-node=1" in ran
    show = lambda: subprocess.run(["scontrol", "-o", "show", "job", job_id], env=slurm,  # noqa: E731
                                  capture_output=True, text=True).stdout
    _wait_for(lambda: "JobState=COMPLETED" in show() or "JobState=FAILED" in show(), 60, "SLURM's job state")
    assert "NumNodes=2" in show() and "JobState=COMPLETED" in show(), show()


def test_a_node_local_state_dir_stops_a_2_node_slurm_job_in_one_line(shards, slurm, tmp_path):
    # node-local scratch, as a user would write it: one folder per node, by the node's name (the
    # submit host has none: the default keeps launch.submit's own check of the config working)
    run, folder = str(tmp_path / "run"), str(tmp_path / "submitit")
    scratch = str(tmp_path / "scratch-${oc.env:SLURMD_NODENAME,submit-host}")
    cli = [sys.executable, "-m", "launch.submit", "tiny", f"data.shards={shards}", f"train.run_dir={run}",
           f"train.state_dir={scratch}", "train.total_steps=4", *TINY, "--executor", "slurm", "--nodes", "2",
           "--tasks-per-node", "1", "--time-min", "20", "--master-addr", "127.0.0.1", "--folder", folder]
    sub = subprocess.run(cli, env=slurm, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    logs = os.path.join(folder, "train")
    ended = lambda: [r for r in launch_job.read_log(run) if r["event"] in ("finished", "failed")]  # noqa: E731
    _wait_for(ended, 400, "the job's end", logs)
    rows = launch_job.read_log(run)
    assert [r["event"] for r in rows] == ["submitted", "started", "failed"], rows  # a config error: no requeue
    # the reason, in launch.jsonl (what launch.status shows) and in the job's log, names the node and its folder
    why = rows[-1]["error"]
    assert why.startswith("config error: train.state_dir=") and "is not shared by all ranks" in why, why
    assert "rank 1 on node2" in why and "scratch-node2" in why and "every node mounts" in why, why
    err = "".join(open(os.path.join(logs, f)).read() for f in os.listdir(logs) if f.endswith("_log.err"))
    assert why in err
    assert not os.path.exists(os.path.join(run, "train_log.jsonl"))  # stopped before the first step


# --------------------------------------------------------------------------------------------
# Re-running "the same command": launcher deaths, config.yaml, unwritable run directories

SMALL = ["model.latent_dim=64", "model.interface_dim=64", "model.latent_heads=4", "model.read_write_heads=4",
         "model.num_latents=16", "data.workers=0", "diffusion.sample_steps=4", "train.sample_count=4",
         "train.global_batch=8", "train.sample_every=0", "train.warmup_steps=2", "train.log_every=5",
         "train.zero_stage=0"]


def _trainer(run, shards, *overrides, nproc=1):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return launcher + ["-m", "rin_scale.train", "tiny", f"data.shards={shards}", f"train.run_dir={run}", *SMALL,
                       *overrides]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return out


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody reaped: exited
    except FileNotFoundError:
        return True


@pytest.mark.timeout(300)
def test_ranks_exit_when_their_torchrun_launcher_is_killed(shards, tmp_path):
    # torchrun starts each rank in a session of its own: kill -9 of the launcher alone reaches
    # neither rank. They must notice and leave, in one line each, and write nothing after.
    run, log = str(tmp_path / "run"), tmp_path / "torchrun.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(_trainer(run, shards, "train.total_steps=100000", "train.state_every=1000",
                                             "train.snapshot_every=1000", "data.workers=1", nproc=2),
                                    cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: len(_steps(run)) >= 3 or launcher.poll() is not None, 300, "3 steps")
        assert launcher.poll() is None, open(log).read()[-3000:]
        ranks = _children(launcher.pid)
        assert len(ranks) == 2, ranks
        assert all(os.getsid(r) == r for r in ranks)  # the ranks lead sessions of their own
        workers = [w for r in ranks for w in _children(r)]  # their DataLoader workers
        assert len(workers) >= 2, workers
        os.kill(launcher.pid, 9)
        launcher.wait()
        killed = time.time()
        _wait_for(lambda: all(_gone(p) for p in ranks + workers), 15,
                  "both ranks and their data workers to exit after their launcher died")
        print(f"ranks and workers gone {time.time() - killed:.1f} s after the launcher")
    finally:
        for p in ranks + workers if "workers" in locals() else []:
            if not _gone(p):
                os.kill(p, 9)
    at_exit = _steps(run)
    time.sleep(3)
    assert _steps(run) == at_exit  # nothing written after
    assert [r["step"] for r in at_exit] == list(range(1, len(at_exit) + 1))
    text = open(log).read()
    # both ranks write to one stream, so one's line may follow the other's unfinished one
    said = re.findall(rf"\[train\] rank (\d): its launcher \(pid {launcher.pid}\) is gone", text)
    assert sorted(said) == ["0", "1"], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert not storage.exists(storage.join(run, "lease.json"))  # rank 0 released it on the way out


def test_config_yaml_follows_a_changed_config_and_keeps_the_old_one(tmp_path, gcs_bucket):
    from rin_scale.config import load_config
    from rin_scale.train import write_config

    for run in (str(tmp_path / "run"), f"{gcs_bucket}/run"):
        wrong = load_config("tiny", [f"train.run_dir={run}", "data.shards=/data/wrong"])
        right = load_config("tiny", [f"train.run_dir={run}", "data.shards=/data/right"])
        assert write_config(wrong) == ""  # the first start
        assert write_config(wrong) == ""  # an unchanged re-run: nothing new
        kept = write_config(right)  # the corrected re-run
        assert re.search(r"/config-\d{8}T\d{6}Z\.yaml$", kept), kept
        assert "/data/wrong" in storage.read_bytes(kept).decode()
        assert rundir.load_run_config(run).data.shards == "/data/right"  # what the eval service reads
        assert write_config(right) == ""
        again = write_config(wrong)  # changed back, within the same second: another name
        assert again != kept and storage.exists(kept) and "/data/right" in storage.read_bytes(again).decode()


@pytest.mark.timeout(300)
def test_a_corrected_rerun_after_a_failed_start_trains_with_its_config(shards, tmp_path):
    run = str(tmp_path / "run")
    bad = subprocess.run(_trainer(run, str(tmp_path / "no-such-shards"), "train.total_steps=2"), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=240)
    assert bad.returncode != 0 and "does not exist" in bad.stderr, bad.stderr[-2000:]
    # the data is checked before anything is written: the failed start leaves no config.yaml to mislead
    assert not storage.exists(storage.join(run, "config.yaml"))
    assert not storage.exists(storage.join(run, "lease.json"))  # released by the failed start
    good = subprocess.run(_trainer(run, shards, "train.total_steps=2", "train.state_every=2",
                                   "train.snapshot_every=2"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=240)
    assert good.returncode == 0, good.stderr[-3000:]
    assert rundir.load_run_config(run).data.shards == shards
    assert [r["step"] for r in _steps(run)] == [1, 2]


@pytest.mark.timeout(300)
def test_an_unwritable_run_directory_fails_in_one_line_before_deepspeed(shards, tmp_path, gcs_bucket):
    # A run_dir (or state_dir) under a regular file cannot be created, even by root.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    ok = str(tmp_path / "ok")
    cases = [([f"train.run_dir={blocker}/run"], f"train.run_dir='{blocker}/run' is not writable"),
             ([f"train.run_dir={ok}", f"train.state_dir={blocker}/states"],
              f"train.state_dir='{blocker}/states' is not writable"),
             (["train.run_dir=gs://no-such-bucket-rin/run", f"train.state_dir={ok}/states"],
              "train.run_dir='gs://no-such-bucket-rin/run' is not writable")]
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        cases.append(([f"train.run_dir={ro}/run"], f"train.run_dir='{ro}/run' is not writable"))
    for overrides, expected in cases:
        cmd = [sys.executable, "-m", "rin_scale.train", "tiny", f"data.shards={shards}", *overrides]
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode != 0, p.stdout[-2000:]
        assert "Traceback" not in p.stderr and expected in p.stderr, p.stderr[-2000:]
        (line,) = [x for x in p.stderr.splitlines() if expected in x]
        assert line.startswith("[train] stopped: ") and "point it at a folder or bucket" in line, line
        assert "accelerator" not in p.stderr + p.stdout  # DeepSpeed was never imported
        assert not os.path.exists(ok + "/lease.json") and not os.path.exists(ok + "/config.yaml")


# --------------------------------------------------------------------------------------------
# The eval service as a multi-task job: one service per task, sharing one snapshot's chunks

from test_evals_service import snapshot, video_data, video_run  # noqa: E402,F401 (video_data: a fixture)


def test_eval_service_as_a_2_node_slurm_job_shares_one_snapshot(video_data, slurm, tmp_path):  # noqa: F811
    from evals.ledger import read as ledger

    run, cfg, model = video_run(str(tmp_path / "run"), video_data, ["eval.num_samples=8", "eval.chunk=2"])
    snapshot(run, cfg, model, 10)
    folder = str(tmp_path / "submitit")
    cli = [sys.executable, "-m", "launch.submit", "--service", "eval", f"train.run_dir={run}", "--once",
           "--executor", "slurm", "--nodes", "2", "--tasks-per-node", "1", "--time-min", "20",
           "--master-addr", "127.0.0.1", "--folder", folder]
    sub = subprocess.run(cli, env=slurm, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    scored = lambda: [r for r in ledger(run) if r["metric"] == "fvd"]  # noqa: E731
    _wait_for(scored, 400, "the eval job's ledger row", os.path.join(folder, "eval"))
    (row,) = scored()
    assert (row["status"], row["samples"], row["chunks"]) == ("ok", 8, 4)
    started = [r for r in launch_job.read_log(run) if r["event"] == "started"]
    assert started[0]["world_size"] == 2 and started[0]["hosts"] == ["node1", "node2"]
