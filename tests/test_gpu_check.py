"""bench/gpu_check.py, the GPU machine's acceptance check, in its reduced CPU form: so that the
command a user runs first on a GPU machine cannot rot between GPU runs."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")
PARTS = ["mfu", "sdpa", "memory", "resume", "nccl", "sampler", "inception"]


def check(tmp_path, *args):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--json", str(out), *args], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=1200)
    return proc, json.loads(out.read_text())


def test_cpu_form_answers_every_part_and_resumes_exactly(tmp_path):
    proc, res = check(tmp_path)
    parts = res["parts"]
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert list(parts) == PARTS
    for name in PARTS:  # one table row each
        assert f"| {name} | {parts[name]['status']} |" in proc.stdout
    assert parts["nccl"]["status"] == "skipped" and "2+ GPUs" in parts["nccl"]["why"]
    assert all(parts[n]["status"] == "ok" for n in PARTS if n != "nccl"), parts
    mfu = parts["mfu"]
    assert 0 < mfu["mfu_fwd_bwd"] <= 1 and 0 < mfu["mfu_step"] <= 1 and mfu["peak_tflops"] > 0
    assert parts["sdpa"]["attention_runs"] and parts["sdpa"]["alone"]["math"].startswith("runs")
    mem = parts["memory"]
    assert 0 < mem["ckpt_on_fwd_bwd_mib"] < mem["ckpt_off_fwd_bwd_mib"]  # checkpointing keeps less
    r = parts["resume"]
    assert r["ranks"] == 2 and r["resumed_at_state"] and r["losses_identical"] and r["reached_end"]
    assert r["killed_at_step"] > r["state_step"] and r["rows_compared"] >= 2 and r["resumed_exactly"]
    assert parts["sampler"]["images_per_s"] > 0 and parts["inception"]["images_per_s"] > 0


def test_a_part_past_its_limit_is_reported_and_the_next_still_runs(tmp_path):
    proc, res = check(tmp_path, "--only", "sampler,nccl", "--limit", "0.5")
    assert proc.returncode == 1
    assert [p["status"] for p in res["parts"].values()] == ["timeout", "timeout"]
    assert "| sampler | timeout |" in proc.stdout and "no result within its 0.5 s limit" in proc.stdout
