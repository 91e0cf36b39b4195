"""Training states under faults: a full disk, a damaged newest state, a state folder that is not
shared by all ranks, a save whose background part fails. Real DeepSpeed ZeRO-2 on 2 gloo processes
(torchrun), real shards of the embedded digits, a real tmpfs for the full disk (root mounts it)."""
import os
import subprocess
import sys

import pytest

from rin_scale import checkpoint, rundir
from test_train import losses, shards  # noqa: F401 - the embedded digits, sharded once per module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["model.latent_dim=64", "model.interface_dim=64", "model.latent_heads=4", "model.read_write_heads=4",
         "model.num_latents=16", "data.workers=2", "diffusion.sample_steps=4", "train.sample_count=4",
         "train.zero_stage=2", "train.global_batch=8", "train.warmup_steps=100", "train.lr=0.02",
         "train.state_every=2", "train.snapshot_every=2", "train.sample_every=0", "train.log_every=2"]


def train(run, *overrides, shards):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "rin_scale.train", "tiny", f"data.shards={shards}", f"train.run_dir={run}", *SMALL, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def said(proc) -> str:
    return proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size): a real tmpfs of that size (a small disk that fills up); unmounted afterwards."""
    mounted = []

    def mount(size: str) -> str:
        path = str(tmp_path / "disk")
        os.makedirs(path)
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True,
                             text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root needed): {out.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", path], check=False)


# A state of this model is about 8.8 MB: 14 MB holds the one at step 2 but not the next beside it
# (the check before a save stops it); 4 MB does not hold the first (DeepSpeed's write fails).
@pytest.mark.timeout(600)
@pytest.mark.parametrize("size,kept", [("14m", 2), ("4m", None)])
def test_a_full_disk_stops_the_save_in_one_line_and_keeps_the_previous_state(shards, tmp_path, tmpfs, size, kept):
    disk = tmpfs(size)
    run = str(tmp_path / "run")
    proc = train(run, f"train.state_dir={disk}", "train.total_steps=6", shards=shards)
    assert proc.returncode != 0, said(proc)
    line = [x for x in proc.stderr.splitlines() if x.startswith("[train] stopped:")]
    assert line and "no space left on the device" in line[0] and disk in line[0], said(proc)
    assert "train.state_dir" in line[0] and "basic_ios" not in proc.stderr, said(proc)
    left = sorted(os.listdir(disk))
    if kept is None:
        assert not [n for n in left if rundir.STEP_RE.search(n)], left  # the partial folder is removed
        assert rundir.newest_complete(run, "states") is None
    else:
        assert [n for n in left if rundir.STEP_RE.search(n)] == [rundir.step_name(kept)], left
        assert checkpoint.verify(os.path.join(disk, rundir.step_name(kept))) == ""
        assert rundir.newest_complete(run, "states")[0] == kept


@pytest.mark.timeout(600)
def test_a_damaged_newest_state_is_skipped_in_one_line_and_the_one_before_resumes_exactly(shards, tmp_path):
    run = str(tmp_path / "run")
    proc = train(run, "train.total_steps=4", shards=shards)
    assert proc.returncode == 0, said(proc)
    first = losses(run)
    newest = os.path.join(run, "states", rundir.step_name(4))
    damaged = os.path.join(newest, rundir.step_name(4), "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    os.truncate(damaged, os.path.getsize(damaged) // 2)  # a bad copy, bit rot: COMPLETE is still there
    stray = os.path.join(newest, "ema.safetensors.tmp-999")  # what a kill in the middle of a write leaves
    open(stray, "wb").write(b"partial")

    proc = train(run, "train.total_steps=6", shards=shards)
    assert proc.returncode == 0, said(proc)
    out = proc.stdout + proc.stderr
    assert f"the state at step 4 is damaged: {damaged} is" in out, said(proc)
    assert "at step 2 " in proc.stdout, said(proc)  # the older state, never the damaged one
    again = losses(run)
    assert sorted(again) == list(range(1, 7))
    assert [again[s] for s in (3, 4)] == [first[s] for s in (3, 4)]  # resumed exactly
    assert not os.path.exists(stray)  # the step was saved again into a clean folder
    assert checkpoint.verify(newest) == ""


def test_a_state_dir_that_is_not_shared_by_all_ranks_stops_at_start_up(shards, tmp_path):
    # node-local scratch on one machine: each rank's train.state_dir is a folder of its own
    local = str(tmp_path / "scratch-rank${oc.env:RANK}")
    proc = train(str(tmp_path / "run"), f"train.state_dir={local}", "train.total_steps=2", shards=shards)
    assert proc.returncode != 0, said(proc)
    line = [x for x in proc.stderr.splitlines() if "is not shared by all ranks" in x]
    assert line and "train.state_dir=" in line[0] and "every node mounts" in line[0], said(proc)
    assert not os.path.exists(os.path.join(tmp_path, "run", "train_log.jsonl"))  # stopped before training


@pytest.mark.timeout(600)
def test_a_failed_background_upload_stops_the_run_at_the_next_step_in_one_line(shards, tmp_path):
    # states written to train.state_dir and copied to RUN/states in the background: that copy
    # fails for step 4 (something that is not a folder is in its way)
    run, local = str(tmp_path / "run"), str(tmp_path / "states")
    os.makedirs(os.path.join(run, "states"))
    open(os.path.join(run, "states", rundir.step_name(4)), "w").write("in the way")
    proc = train(run, f"train.state_dir={local}", "train.total_steps=8", shards=shards)
    assert proc.returncode != 0, said(proc)
    line = [x for x in proc.stderr.splitlines() if x.startswith("[train] stopped:")]
    assert line and "a save's background work failed" in line[0] and rundir.step_name(4) in line[0], said(proc)
    assert rundir.newest_complete(run, "states")[0] == 2
    assert max(losses(run)) < 8  # stopped, not trained to the end
