"""No credential given in a URL reaches any line, file or object name the project writes: a real
2-rank DeepSpeed run (gloo) and the eval service on the GCS emulator (stand-in for a bucket, the same
gcsfs code path), with a token in the run's URL and in the shards' URL, every output grepped."""
import os
import socket
import subprocess
import sys

import pytest

from rin_scale import storage
from rin_scale.config import mask_secrets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "Sup3rSecretT0ken"
SMALL = ["model.latent_dim=64", "model.interface_dim=64", "model.latent_heads=4", "model.read_write_heads=4",
         "model.num_latents=16", "data.workers=2", "diffusion.sample_steps=4", "train.sample_count=4"]


@pytest.mark.parametrize("url, shown", [
    ("data.shards='gs://b/x?token=SECRET' does not exist", "data.shards='gs://b/x?token=***' does not exist"),
    ("s3://KEY:PASS/WITH/SLASH@bucket/x", "s3://KEY:***@bucket/x"),
    ("(https://user:pass@host/a?X-Goog-Signature=SECRET&x=1)", "(https://user:***@host/a?X-Goog-Signature=***&x=1)"),
    ("gs://b/r%3Ftoken%3DSECRET%2Fstates", "gs://b/r%3Ftoken%3D***%2Fstates"),
])
def test_mask_keeps_the_text_around_a_secret(url, shown):
    assert mask_secrets(url) == shown


@pytest.mark.parametrize("url, clean, creds", [
    ("gs://b/r?token=SECRET/states/x", "gs://b/r/states/x", {"token": "SECRET"}),
    ("gs://b/r?token=SECRET", "gs://b/r", {"token": "SECRET"}),
    ("s3://KEY:PASS/WITH/SLASH@bucket/x", "s3://bucket/x", {"user": "KEY", "password": "PASS/WITH/SLASH"}),
    ("https://u:p%40ss@host/x", "https://host/x", {"user": "u", "password": "p@ss"}),
])
def test_credentials_leave_the_url_before_the_filesystem_sees_it(url, clean, creds):
    assert storage.split_credentials(url) == (clean, creds)


def objects(gcs_bucket: str) -> dict:
    fs, path = storage.fs_path(gcs_bucket)
    fs.invalidate_cache()
    return {name: fs.cat_file(name) for name in fs.find(path)}


@pytest.mark.timeout(1200)
def test_no_secret_in_any_output_of_a_bucket_run(gcs_bucket, tmp_path):
    from data_tools.shard import main as shard_main

    assert shard_main(["--embedded", "digits", "--split", "heldout", "--shard-size", "40", "--quiet",
                       f"{gcs_bucket}/digits"]) == 0
    run = f"{gcs_bucket}/run?token={SECRET}"
    tmp = tmp_path / "tmp"  # the processes' own temporary folder: what they leave behind is seen
    tmp.mkdir()
    (tmp / f"rin_tb_{socket.gethostname()}_999999999_stale").mkdir()  # left by a killed trainer (no such pid)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "TMPDIR": str(tmp)}
    train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
             "rin_scale.train", "tiny", f"data.shards={gcs_bucket}/digits?token={SECRET}", f"train.run_dir={run}",
             f"train.state_dir={tmp_path}/states", "train.global_batch=8", "train.total_steps=4",
             "train.state_every=2", "train.snapshot_every=2", "train.sample_every=2", "train.log_every=2",
             "train.warmup_steps=100", *SMALL]
    evals = [sys.executable, "-m", "evals.service", "--run", run, "--once", "--limit", "1", "eval.num_samples=2",
             "eval.batch=2", "eval.steps=2", "eval.reference_samples=4",
             f"data.shards={gcs_bucket}/digits?token={SECRET}"]  # config.yaml keeps it masked: given again
    status = [sys.executable, "-m", "launch.status", run]
    out = ""
    for cmd in (train, evals, status):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
        out += proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{cmd[2:4]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert SECRET not in out, [line for line in out.splitlines() if SECRET in line]

    written = objects(gcs_bucket)
    names = sorted(written)
    for part in ("run/config.yaml", "run/train_log.parts/", "run/tb/", "run/states/step-000000004/COMPLETE",
                 "run/snapshots/step-000000004/COMPLETE", "run/eval/"):
        assert any(part in n for n in names), (part, names)
    assert [n for n in names if SECRET in n or "token" in n] == []
    assert [n for n, data in written.items() if SECRET.encode() in data] == []
    local = [os.path.join(b, f) for b, _, fs in os.walk(tmp_path) for f in fs]
    assert [f for f in local if SECRET in f or SECRET.encode() in open(f, "rb").read()] == []
    # the killed trainer's scratch folder is gone, and the trainers' own with them
    assert [f for f in os.listdir(tmp) if f.startswith("rin_tb_")] == []
    assert "run?token=***" in out  # the run is still named, masked


def test_a_port_and_an_at_sign_in_the_path_are_not_a_password():
    url = "http://127.0.0.1:8080/models/rin@v2.tar"
    assert storage.split_credentials(url) == (url, {}) and mask_secrets(url) == url
