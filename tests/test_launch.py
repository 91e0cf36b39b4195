"""launch: sbatch rendering (--dry-run), bad options, the job plumbing on real local processes
(submitit's LocalExecutor, gloo), requeue on the preemption signal with its cap, and status."""
import json
import os
import re
import sys
import time

import cloudpickle
import yaml

from launch import job as launch_job
from launch import status as launch_status
from launch import submit as launch_submit
from rin_scale.config import load_config, to_dict

# the probe below runs inside submitit's task processes, which cannot import this test module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def sbatch_directives(script: str) -> dict:
    out = {}
    for line in script.splitlines():
        m = re.match(r"#SBATCH --([\w-]+)(?:=(.*))?$", line)
        if m:
            out[m.group(1)] = m.group(2) if m.group(2) is not None else True
    return out


def split_dry_run(text: str) -> tuple[str, dict]:
    script, config = text.split("# ---- resolved config ----\n")
    script = script.split("# ---- sbatch script ----\n", 1)[1]
    return script.rstrip("\n"), yaml.safe_load(config)


def test_dry_run_prints_the_sbatch_script_for_4_nodes_x_8_gpus(capsys, tmp_path):
    run = str(tmp_path / "runs" / "big")
    argv = ["imagenet256", f"train.run_dir={run}", "train.lr=5e-4", "--executor", "slurm",
            "--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "12", "--mem-gb", "480",
            "--partition", "gpu", "--account", "proj7", "--qos", "high", "--constraint", "a100",
            "--exclusive", "--time-min", "2880", "--sbatch", "mail-type=END",
            "--setup", "module load cuda/12.4", "--setup", "source /opt/env/bin/activate", "--dry-run"]
    assert launch_submit.main(argv) == 0
    script, config = split_dry_run(capsys.readouterr().out)
    d = sbatch_directives(script)
    assert d["nodes"] == "4"
    assert d["ntasks-per-node"] == "8"  # one task per GPU
    assert d["gpus-per-node"] == "8"
    assert d["cpus-per-task"] == "12"
    assert d["mem"] == "480GB"
    assert (d["partition"], d["account"], d["qos"], d["constraint"]) == ("gpu", "proj7", "high", "a100")
    assert d["exclusive"] is True
    assert d["time"] == "2880"
    assert d["mail-type"] == "END"
    assert d["signal"].startswith("USR2@")  # what submitit's requeue handler listens for
    lines = script.splitlines()
    srun = [i for i, line in enumerate(lines) if line.startswith("srun ")]
    assert len(srun) == 1 and "-m submitit.core._submit" in lines[srun[0]]
    # one task down ends the step at once; a lost node is requeued by SLURM itself
    assert "--kill-on-bad-exit=1" in lines[srun[0]] and d["requeue"] is True
    assert lines.index("module load cuda/12.4") < lines.index("source /opt/env/bin/activate") < srun[0]
    folder = os.path.join(run, "submitit", "train")
    assert d["output"] == f"{folder}/%j_0_log.out" and lines[srun[0]].endswith(folder)
    # the resolved config is the one the trainer will load
    expected = to_dict(load_config("imagenet256", [f"train.run_dir={run}", "train.lr=5e-4"]))
    assert config == expected
    assert not os.path.exists(run)  # a dry run submits and writes nothing


def test_bad_options_give_one_line_errors(capsys, tmp_path):
    run = f"train.run_dir={tmp_path}/r"
    cases = [
        (["tiny", run, "--executor", "slurm", "--nodes", "1", "--gpus-per-node", "3"], "global_batch=64"),
        (["tiny", run, "--executor", "local", "--nodes", "2"], "--nodes 1"),
        (["tiny", run, "--executor", "slurm", "--sbatch", "mail-type"], "KEY=VALUE"),
        (["tiny", run, "train.zero_stage=5"], "train.zero_stage"),
        (["--service", "eval", "--executor", "local"], "train.run_dir=RUN"),
        (["tiny", run, "--executor", "slurm", "--time-min", "2"], "--signal-delay-s=120"),
    ]
    for argv, needle in cases:
        assert launch_submit.main(argv + ["--dry-run"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, (argv, err)


def probe(argv):
    """Stand-in for the trainer: records its distributed env, all-reduces over gloo, and keeps
    all-reducing until the file argv[1] exists when argv[0] == "wait"."""
    import torch
    import torch.distributed as dist

    out = argv[-1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                          "CUDA_VISIBLE_DEVICES")}
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    env["sum"] = t.item()
    with open(f"{out}/env-{rank}-{os.getpid()}.json", "w") as f:
        json.dump(env, f)
    if argv[0] == "wait":
        while not os.path.exists(argv[1]):
            dist.all_reduce(torch.zeros(1))
            time.sleep(0.05)
    dist.destroy_process_group()
    return 0


def _wait_for(cond, timeout, what):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _executor(tmp_path, tasks=2, gpus=0, max_requeues=3):
    args = launch_submit.parse_args(["tiny", f"train.run_dir={tmp_path}/run", "--executor", "local",
                                     "--tasks-per-node", str(tasks), "--max-requeues", str(max_requeues)]
                                    + (["--gpus-per-node", str(gpus)] if gpus else []))
    return launch_submit.make_executor(args, str(tmp_path / "run"), "probe", "local")


def test_local_job_exports_the_distributed_env_deepspeed_expects(tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    # 2 "GPUs" on the CPU: CUDA_VISIBLE_DEVICES must reach every task whole, not one GPU each
    ex = _executor(tmp_path, tasks=2, gpus=2)
    job = ex.submit(launch_job.LaunchJob(probe, ["once", run], run, kind="probe"))
    assert job.results() == [0, 0]  # both tasks returned
    envs = [json.load(open(os.path.join(run, f))) for f in sorted(os.listdir(run)) if f.startswith("env-")]
    assert sorted(e["RANK"] for e in envs) == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"2"}
    assert sorted(e["LOCAL_RANK"] for e in envs) == ["0", "1"]
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs} == {"0,1"}
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
    assert {e["sum"] for e in envs} == {3.0}  # the gloo all-reduce really ran across both
    events = [r["event"] for r in launch_job.read_log(run)]
    assert events == ["started", "finished"]


def test_preemption_signal_requeues_until_the_cap(tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    stop = str(tmp_path / "stop")
    ex = _executor(tmp_path, tasks=2, max_requeues=1)
    job = ex.submit(launch_job.LaunchJob(probe, ["wait", stop, run], run, kind="probe", max_requeues=1))
    starts = lambda: len([f for f in os.listdir(run) if f.startswith("env-0-")])  # noqa: E731
    _wait_for(lambda: starts() == 1, 60, "the first start")
    job._interrupt()  # what SLURM sends before preemption or the time limit
    _wait_for(lambda: starts() == 2, 60, "the requeued start")
    rows = launch_job.read_log(run)
    assert [r["event"] for r in rows] == ["started", "requeued", "started"]
    assert rows[1]["requeues"] == 1 and rows[1]["reason"] == "preempted"
    assert rows[2]["requeues"] == 1 and rows[0]["job_id"] == rows[2]["job_id"] == str(job.job_id)
    job._interrupt()  # the cap (1) is reached: the job ends instead
    _wait_for(lambda: job.done(), 60, "the job to end")
    rows = launch_job.read_log(run)
    assert rows[-1]["event"] == "requeue_refused" and rows[-1]["max_requeues"] == 1
    assert starts() == 2
    s = launch_status.status(run)
    (j,) = s["jobs"]
    assert j["requeues"] == 1 and j["reasons"] == ["preempted"] and j["state"] == "STOPPED" and j["starts"] == 2


def test_eval_service_job_runs_beside_the_trainer_one_service_per_gpu(capsys, tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    # the service's job reads the run's own config (written by the trainer), overrides on top
    cfg = load_config("tiny", [f"train.run_dir={run}", "eval.num_samples=300"])
    from rin_scale.config import dump_yaml

    open(os.path.join(run, "config.yaml"), "w").write(dump_yaml(cfg))
    argv = ["--service", "eval", f"train.run_dir={run}", "eval.batch=25", "--once", "--executor", "slurm",
            "--gpus-per-node", "1", "--python", "python"]
    assert launch_submit.main(argv + ["--dry-run"]) == 0
    script, config = split_dry_run(capsys.readouterr().out)
    d = sbatch_directives(script)
    assert (d["nodes"], d["ntasks-per-node"], d["gpus-per-node"]) == ("1", "1", "1")
    assert d["job-name"] == "rin-eval-tiny" and d["output"].startswith(os.path.join(run, "submitit", "eval"))
    assert "srun" in script and " python -u -m submitit.core._submit " in script
    assert config["eval"]["num_samples"] == 300 and config["eval"]["batch"] == 25
    args = launch_submit.parse_args(argv)
    c, r, service_argv = launch_submit.resolve(args)
    j = launch_submit.make_job(args, c, r, service_argv)
    assert (j.entry, j.kind, j.run_dir) == ("evals.service:main", "eval", run)
    assert j.argv == ["--run", run, "--once", "eval.batch=25"]
    # G GPUs x N nodes: one service per GPU, sharing each snapshot's chunks
    assert launch_submit.main(argv + ["--gpus-per-node", "4", "--nodes", "2", "--dry-run"]) == 0
    d = sbatch_directives(split_dry_run(capsys.readouterr().out)[0])
    assert (d["nodes"], d["ntasks-per-node"], d["gpus-per-node"]) == ("2", "4", "4")


def test_requeue_reason_tells_the_time_limit_from_a_preemption():
    j = launch_job.LaunchJob("x:y", [], "unused", timeout_min=60, signal_delay_s=120)
    j._started = time.time() - 300  # signalled 5 minutes into an hour: preempted
    assert j._reason() == "preempted"
    j._started = time.time() - (3600 - 120)  # when sbatch --signal=USR2@120 fires
    assert j._reason() == "timeout"


def test_status_reports_the_newest_step_scored_not_the_last_row(tmp_path):
    from evals import ledger

    run = str(tmp_path / "run")
    os.makedirs(run)
    # eval.order=newest and a second service: rows land out of step order; class_accuracy rides along
    for step, metric, value in ((300, "fid", 12.5), (300, "class_accuracy", 0.9), (100, "fid", 40.0),
                                (200, "fid", None)):
        ledger.append(run, {"step": step, "metric": metric, "value": value, "status": "ok", "time": time.time()}, "o")
    e = launch_status.status(run)["newest_eval"]
    assert (e["step"], e["metric"], e["value"]) == (300, "fid", 12.5)
    assert "newest eval: step 300, metric fid, value 12.5" in launch_status.render(launch_status.status(run))
