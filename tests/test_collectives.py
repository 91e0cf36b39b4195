"""Every collective of a 2-process training run takes tensors on the engine's device type: NCCL
(every CUDA run) cannot reduce CPU tensors, so one CPU tensor in a collective stops a multi-GPU run
at its first step. On this machine the device is the CPU; on a GPU machine the same test runs
unchanged (`pytest -m gpu`) and then demands CUDA tensors everywhere."""
import json
import os
import subprocess
import sys

import pytest
import torch

from rin_scale.config import load_config
from rin_scale.model import RIN
from rin_scale.optim import param_groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = os.environ.get("RIN_SCALE_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_every_collective_of_a_training_run_is_on_the_engine_device(tmp_path):
    shards = str(tmp_path / "digits")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "AUDIT_DIR": str(tmp_path / "audit")}
    subprocess.run([sys.executable, "-m", "data_tools.shard", "--embedded", "digits", "--split", "heldout",
                    "--quiet", shards], cwd=ROOT, env=env, check=True)
    # ZeRO-3 with activation checkpointing, LAMB (its norms are all-reduced over the partitions; its
    # passes compiled, so that a GPU run of this test compiles them for the GPU),
    # logging, snapshots, preview grids and states: every collective the trainer makes.
    overrides = [f"data.shards={shards}", f"train.run_dir={tmp_path / 'run'}", "model.latent_dim=64",
                 "model.interface_dim=64", "model.latent_heads=4", "model.read_write_heads=4", "model.num_latents=16",
                 "diffusion.sample_steps=2", "train.sample_count=4", "train.zero_stage=3", "train.optimizer=lamb",
                 "train.compile_optimizer=always", "train.activation_checkpointing=1", "train.global_batch=8",
                 "train.total_steps=4", "train.log_every=2", "train.state_every=2", "train.snapshot_every=2",
                 "train.sample_every=2", "data.workers=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "collective_audit.py"), "tiny", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "LAMB passes compiled" in proc.stdout, proc.stdout[-2000:]
    # LAMB's trust-ratio norms: one all-reduce per param group (decay or not, trust ratio or not) and
    # step, over all of the group's tensors; with one group per tensor it was one per tensor
    cfg = load_config("tiny", overrides)
    groups = [g["name"] for g in param_groups(RIN(cfg.model), cfg, one_per_param=False)]
    calls = []
    for rank in (0, 1):
        with open(tmp_path / "audit" / f"rank-{rank}.jsonl") as f:
            mine = [json.loads(line) for line in f]
        calls += mine
        lamb = [c["name"] for c in mine if "rin_scale/optim.py:" in c["caller"]]
        assert lamb == ["all_reduce"] * (4 * len(groups)), (rank, len(lamb), groups)
    names = {c["name"] for c in calls}
    ours = {c["caller"].split(":")[0] for c in calls if c["caller"].startswith(("rin_scale/", "/"))}
    assert {"all_reduce", "all_gather", "broadcast_object_list"} <= names, names
    assert any("rin_scale/" in c["caller"] and c["name"] == "all_reduce" for c in calls), ours
    wrong = sorted({(c["name"], c["caller"], tuple(c["devices"])) for c in calls
                    if any(d != DEVICE for d in c["devices"])})
    assert not wrong, f"collectives with tensors off the {DEVICE} device: {wrong}"
