"""The DeepSpeed trainer end to end: real DeepSpeed on 2 gloo processes (torchrun), real shards of
the embedded digits, TensorBoard events read back with TensorBoard's own reader."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from rin_scale import rundir, storage
from conftest import bf16_missing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["model.latent_dim=64", "model.interface_dim=64", "model.latent_heads=4", "model.read_write_heads=4",
         "model.num_latents=16", "data.workers=0", "diffusion.sample_steps=4", "train.sample_count=4"]


def train(run, nproc, *overrides, shards, check=True):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = launcher + ["-m", "rin_scale.train", "tiny", f"data.shards={shards}", f"train.run_dir={run}"] + SMALL + \
        list(overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(run):
    return {r["step"]: r["loss"] for r in storage.read_jsonl(storage.join(run, "train_log.jsonl"))}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "digits")
    subprocess.run([sys.executable, "-m", "data_tools.shard", "--embedded", "digits", "--split", "train", "--quiet",
                    out], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": ROOT})
    return out


# Both precisions a run can train in; bf16 only where the hardware has it (emulated bf16 on an
# AVX2-only CPU would cost minutes and test nothing a user runs there: auto picks fp32 on it).
NO_BF16 = bf16_missing()
PRECISIONS = ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(NO_BF16 is not None, reason=str(NO_BF16)))]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_two_ranks_zero2_logs_snapshots_and_resumes_exactly(shards, tmp_path, precision):
    # Warmup longer than the run: the LR then does not depend on total_steps, so a run stopped at
    # step 4 and continued to 8 must see exactly the LRs, batches and noise of a run of 8. Two
    # DataLoader workers, as every preset has: starting them must not shift the noise stream.
    common = ["train.zero_stage=2", "train.global_batch=8", "train.warmup_steps=100", "train.lr=0.02",
              "train.state_every=2", "train.snapshot_every=4", "train.sample_every=4", "train.log_every=2",
              "data.workers=2"]
    full = str(tmp_path / "full")
    out = train(full, 2, *common, f"train.precision={precision}", "train.total_steps=8", shards=shards).stdout
    assert "slowest rank " in out and f"({os.uname().nodename})" in out, out[-2000:]

    # TensorBoard: the scalars and the sample grid, read with TensorBoard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(full, "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/images_per_sec", "perf/step_time",
                "perf/data_wait", "perf/tflops", "perf/mfu", "perf/memory_gb", "loss_by_t/0.00-0.25"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8]
    # the slowest of the 2 ranks, and its host, at every log step
    assert [e.step for e in acc.Scalars("perf/slowest_step_time")] == [2, 4, 6, 8]
    assert {e.value for e in acc.Scalars("perf/slowest_rank")} <= {0, 1}
    assert [e.step for e in acc.Tensors("perf/slowest_host/text_summary")] == [2, 4, 6, 8]
    assert 0 < acc.Scalars("perf/mfu")[-1].value < 1
    loss = losses(full)
    assert sum(loss[s] for s in (6, 7, 8)) < 0.7 * sum(loss[s] for s in (1, 2, 3)), loss  # ZeRO-2 learns
    assert "samples/ema" in images and [e.step for e in acc.Images("samples/ema")] == [4, 8]
    # every one of the 4 tiles (16x16, in one row) holds a sample, not one flat colour
    import io

    from PIL import Image

    grid = np.asarray(Image.open(io.BytesIO(acc.Images("samples/ema")[-1].encoded_image_string)).convert("L"))
    tiles = [grid[1:17, 1 + 17 * c:17 * (c + 1)] for c in range(4)]
    assert grid.shape == (18, 69) and all(t.std() > 0 for t in tiles), [float(t.std()) for t in tiles]
    assert "routing/maps" in images and any(t.startswith("routing/read_entropy/block1/") for t in scalars), scalars

    # Snapshots: EMA weights load into the plain model without DeepSpeed, and it samples.
    from rin_scale.diffusion import sample

    snaps = rundir.list_complete(full, "snapshots")
    assert [s for s, _ in snaps] == [4, 8]
    model, dcfg, meta = rundir.load_snapshot_model(snaps[-1][1])
    assert meta["step"] == 8 and meta["images_seen"] == 64
    x = sample(model, (2, 3, 16, 16), dcfg, labels=torch.tensor([1, 2]), steps=3)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1

    # Stopped at step 4, whose COMPLETE marker is then lost (a job killed while saving, after its
    # snapshot): the rerun must ignore that state, resume at step 2, replace the snapshot of the
    # abandoned step 4, and reproduce the uninterrupted run bit for bit: losses, EMA, snapshots.
    # The rerun asks for precision=auto, which must keep the state's precision (its probe alone
    # would pick bf16 on a CPU with native bf16, fp32 on others).
    part = str(tmp_path / "part")
    train(part, 2, *common, f"train.precision={precision}", "train.total_steps=4", shards=shards)
    assert [s for s, _ in rundir.list_complete(part, "states")] == [2, 4]
    os.remove(os.path.join(part, "states", rundir.step_name(4), rundir.COMPLETE))
    with open(os.path.join(part, "snapshots", rundir.step_name(4), "ema.safetensors"), "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)  # the abandoned trajectory's weights: must not survive the resume
    out = train(part, 2, *common, "train.precision=auto", "train.total_steps=8", shards=shards).stdout
    assert "at step 2 " in out and "discarded snapshot step 4" in out, out[-2000:]
    assert f"precision {precision} (train.precision=auto, as chosen at the run's first start)" in out, out[-2000:]
    assert "keeps freed memory for reuse" in out, out[-2000:]  # glibc on the CPU: perf.keep_freed_memory
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)], (a, b)
    for step in (4, 8):
        snap = os.path.join(rundir.step_name(step), "ema.safetensors")
        assert open(os.path.join(full, "snapshots", snap), "rb").read() == \
            open(os.path.join(part, "snapshots", snap), "rb").read(), step

    if precision == "bf16":
        return  # the rest does not depend on the precision
    # The 2-rank state resumes in 1 process (same global batch: micro-batch 8, no accumulation).
    out = train(full, 1, *common, f"train.precision={precision}", "train.total_steps=10", shards=shards).stdout
    assert "at step 8 " in out and "saved by 2 rank(s)" in out, out[-2000:]
    c = losses(full)
    assert sorted(c) == list(range(1, 11)) and all(math.isfinite(c[s]) for s in (9, 10))
    assert json.load(open(os.path.join(full, "states", rundir.step_name(10), "trainer.json")))["world_size"] == 1

    # A re-run whose model has another shape (the preset changed since, or a model.* override) is
    # refused in one line naming the fix, and leaves the run's config.yaml as it was.
    config = open(os.path.join(full, "config.yaml")).read()
    proc = train(full, 1, *common, "train.total_steps=12", "model.num_blocks=2", shards=shards, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "holds a model of another shape" in proc.stderr and "train.run_dir" in proc.stderr, proc.stderr[-3000:]
    assert open(os.path.join(full, "config.yaml")).read() == config


@pytest.mark.timeout(600)
def test_zero_states_resume_at_a_new_world_size_with_their_optimizer_moments(shards, tmp_path):
    # 2 ranks train 4 steps, then 1 process trains steps 5-6 from their state. ZeRO-0 keeps the whole
    # optimizer in one file; ZeRO-2 and 3 states are partitioned per rank and go through DeepSpeed's
    # universal checkpoint. All three must take the same steps 5-6 (decay-0 EMA = the weights); had the
    # moments or LAMB's step counts restarted, the updates would differ by far more than rounding.
    # fp32: in bf16, ZeRO-0/2/3 round their reductions differently and LAMB's first steps (tiny
    # second moments) amplify that to a few percent, on CPUs with native bf16 as on GPUs. The exact
    # bf16 checks are the resume test (same world size) and activation checkpointing's.
    common = ["train.precision=fp32", "train.global_batch=8", "train.optimizer=lamb", "train.lr=5e-3", "train.warmup_steps=2",
              "train.state_every=4", "train.snapshot_every=2", "train.sample_every=0", "train.ema_decay=0",
              "train.ema_warmup=false"]
    update = {}
    for stage in (0, 2, 3):
        run = str(tmp_path / f"z{stage}")
        train(run, 2, f"train.zero_stage={stage}", "train.total_steps=4", *common, shards=shards)
        out = train(run, 1, f"train.zero_stage={stage}", "train.total_steps=6", *common, shards=shards).stdout
        assert "at step 4 " in out and "saved by 2 rank(s)" in out, out[-2000:]
        assert ("universal checkpoint" in out) == (stage > 0), out[-2000:]
        (_, at4), (_, at6) = rundir.list_complete(run, "snapshots")[-2:]
        w4, w6 = (rundir.load_snapshot_model(u)[0].state_dict() for u in (at4, at6))
        update[stage] = torch.cat([(w6[k] - w4[k]).flatten() for k in w4])
    for stage in (2, 3):
        rel = ((update[stage] - update[0]).norm() / update[0].norm()).item()
        print(f"ZeRO-{stage}: relative update difference {rel:.2e}")
        # measured in fp32: 1.2e-4 (ZeRO-2), 1.1e-4 (ZeRO-3); with the moments restarted 0.62, and with
        # every group given group 0's decay and LAMB flag (DeepSpeed's ZeRO-3 universal load) 0.49
        assert rel < 1e-3, (stage, rel)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage,extra", [
    (1, ["train.optimizer=lamb", "train.lr=5e-3"]),  # LAMB with trust ratios over ZeRO partitions
    # the precision auto picks here, named: each run's own probe could read otherwise on a busy machine
    (3, ["train.optimizer=adamw", "train.activation_checkpointing=1", "train.grad_clip=1.0",
         f"train.precision={'fp32' if NO_BF16 else 'bf16'}"]),
])  # ZeRO-2: the first test
def test_zero_stages_train_and_loss_falls(shards, tmp_path, stage, extra):
    run = str(tmp_path / f"z{stage}")
    train(run, 2, f"train.zero_stage={stage}", "train.global_batch=16", "train.total_steps=20",
          "train.warmup_steps=5", "train.state_every=20", "train.snapshot_every=20", "train.sample_every=0",
          "train.log_every=10", "train.ema_decay=0", "train.ema_warmup=false", *extra, shards=shards)
    loss = losses(run)
    first = sum(loss[s] for s in range(1, 6)) / 5
    last = sum(loss[s] for s in range(16, 21)) / 5
    assert last < 0.7 * first, (stage, first, last)
    if "train.activation_checkpointing=1" in extra:  # the same run without it: same losses and gradients
        plain = str(tmp_path / f"z{stage}-plain")
        train(plain, 2, f"train.zero_stage={stage}", "train.global_batch=16", "train.total_steps=3",
              "train.warmup_steps=5", "train.state_every=20", "train.snapshot_every=20", "train.sample_every=0",
              "train.log_every=10", "train.ema_decay=0", "train.ema_warmup=false",
              *[e for e in extra if "activation_checkpointing" not in e], shards=shards)
        rows = {r["step"]: r for r in storage.read_jsonl(storage.join(run, "train_log.jsonl"))}
        for r in storage.read_jsonl(storage.join(plain, "train_log.jsonl")):
            # bit-identical: the recompute runs the same kernels in the same precision (the forward's
            # autocast state is re-entered)
            assert (r["loss"], r["grad_norm"]) == (rows[r["step"]]["loss"], rows[r["step"]]["grad_norm"]), \
                (r, rows[r["step"]])
    model, _, meta = rundir.load_snapshot_model(rundir.newest_complete(run, "snapshots")[1])
    assert meta["step"] == 20
    # With decay 0 the EMA is the weights themselves: the snapshot (under ZeRO-3 gathered from each
    # rank's slices) must equal DeepSpeed's own consolidation of the state's fp32 partitions.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = rundir.step_name(20)
    ds = get_fp32_state_dict_from_zero_checkpoint(os.path.join(run, "states", tag), tag=tag)
    ours = model.state_dict()
    assert set(ds) == set(ours)
    for name, w in ds.items():
        assert torch.equal(ours[name], w.float()), name
    from rin_scale.config import load_config
    from rin_scale.model import RIN

    torch.manual_seed(0)  # the trainer's initial weights
    init = RIN(load_config("tiny", SMALL).model)
    moved = [not torch.allclose(p, q) for p, q in zip(model.parameters(), init.parameters())]
    assert sum(moved) > len(moved) // 2


def test_dry_run_prints_size_and_deepspeed_config():
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "rin_scale.train", "imagenet1024", "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "16384 interface tokens" in out.stdout and '"stage": 2' in out.stdout


def test_bad_config_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "rin_scale.train", "tiny", "train.global_batch=7", "--dry-run"],
                         cwd=ROOT, env={**env, "WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "train.global_batch=7 is not divisible by the world size 2" in out.stderr


def test_deepspeed_launcher_argument_is_accepted():
    # `deepspeed` (the launcher) appends --local_rank=N to the trainer's command line.
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "rin_scale.train", "tiny", "--local_rank=0", "--dry-run"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("stage", [0, 2])  # our optimizer's check, and ZeRO's
def test_non_finite_steps_in_a_row_stop_the_run_with_one_line(shards, tmp_path, stage):
    # An absurd LR blows the weights up after the first step; every later step has a non-finite
    # loss, is skipped (the weights stay as they were), and the third in a row stops the run.
    run = str(tmp_path / "nan")
    proc = train(run, 1, "train.lr=1e30", "train.warmup_steps=1", "train.max_nonfinite=2", "train.total_steps=50",
                 "train.global_batch=8", "train.sample_every=0", f"train.zero_stage={stage}", shards=shards, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "3 steps in a row had a non-finite loss or gradient" in proc.stderr, proc.stderr[-2000:]
    assert "lower train.lr" in proc.stderr
    skipped = [r["step"] for r in storage.read_jsonl(storage.join(run, "train_log.jsonl")) if r["skipped"]]
    assert skipped == [2, 3], skipped  # counted until the stop; nothing reached the weights


@pytest.mark.timeout(600)
def test_bucket_run_uploads_states_and_resumes_from_the_bucket(shards, gcs_bucket, tmp_path):
    """RUN on the GCS emulator (stand-in for a real bucket, same gcsfs code path); DeepSpeed
    writes states to a local folder first. The second job has lost that folder (another node)."""
    run, local = f"{gcs_bucket}/run", str(tmp_path / "states")
    args = [f"train.state_dir={local}", "train.global_batch=8", "train.state_every=3", "train.snapshot_every=3",
            "train.sample_every=3", "train.log_every=3", "train.warmup_steps=100"]
    train(run, 1, *args, "train.total_steps=3", shards=shards)
    shutil.rmtree(local)
    out = train(run, 1, *args, "train.total_steps=6", shards=shards).stdout
    assert "at step 3 " in out, out[-2000:]
    assert [s for s, _ in rundir.list_complete(run, "states")] == [3, 6]
    assert sorted(losses(run)) == list(range(1, 7))
    model, _, meta = rundir.load_snapshot_model(rundir.newest_complete(run, "snapshots")[1])
    assert meta["step"] == 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    fs, path = storage.fs_path(f"{run}/tb")
    fs.get(path + "/", str(tb), recursive=True)
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [3, 6]
