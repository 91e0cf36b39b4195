"""The README's first command, shortened: `python -m launch.demo` end to end (shard, DeepSpeed ZeRO-2
on 2 local processes, eval service), then every stage's output checked where a user would look.

Stand-in: no pretrained Inception weights exist offline, so the service scores FID with the real
InceptionV3 architecture at seeded random weights (it warns, and the ledger names the extractor).
"""
import json
import math
import os
import subprocess
import sys

from evals import ledger as eval_ledger
from rin_scale import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shortened_demo_leaves_every_stage_output(demo_run, tmp_path):
    out, proc = demo_run  # conftest.demo_run: the README's first command, shortened, run once

    # 1. shards: the training and held-out splits of the embedded digits, with manifests
    for split, n in (("train", 1437), ("heldout", 360)):
        man = json.load(open(out / "data" / f"digits-{split}" / "data-manifest.json"))
        assert man["total"] == n and all((out / "data" / f"digits-{split}" / s["name"]).exists() for s in man["shards"])

    # 2. training: resolved config, complete states and rolling snapshots, TensorBoard loss and samples
    run = str(out / "run-tiny")
    assert "zero_stage: 2" in open(os.path.join(run, "config.yaml")).read()
    assert [s for s, _ in rundir.list_complete(run, "states")][-1] == 12
    snaps = [s for s, _ in rundir.list_complete(run, "snapshots")]
    assert snaps == [12], snaps  # one EMA snapshot, at the end: the only one the demo scores
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run, "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert acc.Scalars("train/loss")[-1].step == 12 and "samples/ema" in acc.Tags()["images"]
    assert "2 rank(s) on cpu, ZeRO-2" in proc.stdout

    # 3. evaluation: FID, class accuracy and the digit-domain metrics per snapshot, the same in TensorBoard
    ledger = eval_ledger.read(run)
    for metric in ("fid", "class_accuracy", "domain_fid", "laplacian_ratio"):
        rows = [r for r in ledger if r["metric"] == metric]
        assert [r["step"] for r in rows] == [12] and all(r["status"] == "ok" for r in rows), ledger
    assert all(r["extractor"] == "inception-v3-random-seed0" for r in ledger if r["metric"] == "fid")
    domain = [r for r in ledger if r["metric"] == "domain_fid"]
    assert all(r["extractor"].startswith("digits-cnn-v1-") and r["floor_samples"] == 360 for r in domain)
    ev = EventAccumulator(os.path.join(run, "eval", "tb"), size_guidance={"images": 0, "scalars": 0})
    ev.Reload()
    assert [e.step for e in ev.Scalars("eval/fid")] == [12] and "eval/samples" in ev.Tags()["images"]
    assert [e.step for e in ev.Scalars("eval/domain_fid")] == [12]

    # 4. the summary: where the run is, the final metrics (domain FID and its real-vs-real floor, class
    # accuracy), how to look at it
    final = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"final"')))["final"]
    assert set(final) == {"fid", "class_accuracy", "domain_fid", "domain_fid_floor", "laplacian_ratio"}, final
    assert all(math.isfinite(v) for v in final.values()), final
    assert 0 <= final["class_accuracy"] <= 1 and final["domain_fid"] >= 0 and 0 < final["domain_fid_floor"]
    assert final["domain_fid_floor"] == domain[-1]["floor"] and final["laplacian_ratio"] > 0
    assert "final samples : domain FID" in proc.stdout and "real-vs-real floor" in proc.stdout
    assert f"tensorboard --logdir {run}" in proc.stdout and f"rin_scale.sample {run}" in proc.stdout

    # 5. the sampling CLI on the run: a grid with one column per class, ADM-style npz, same seed same samples
    import numpy as np
    from PIL import Image

    def sample_cli(*args):
        p = subprocess.run([sys.executable, "-m", "rin_scale.sample", run, *args], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    grid, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    assert "step 12" in sample_cli("--n", "20", "--out", str(grid), "--npz", str(npz)).stderr
    assert Image.open(grid).size == (10 * 17 + 1, 2 * 17 + 1)  # 16x16 samples, 1-pixel padding
    a = np.load(npz)
    assert a["arr_0"].shape == (20, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    assert a["arr_1"].tolist() == list(range(10)) * 2
    sample_cli("--n", "20", "--out", str(grid), "--npz", str(tmp_path / "again.npz"))
    assert np.array_equal(np.load(tmp_path / "again.npz")["arr_0"], a["arr_0"])
    sample_cli("--n", "4", "--class", "3", "--out", str(grid), "--npz", str(npz))
    assert np.load(npz)["arr_1"].tolist() == [3] * 4

    # 6. a stage that fails ends with its cause (here the trainer's config check), not with torchrun's
    # ChildFailedError traceback and report table burying it
    p = subprocess.run([sys.executable, "-m", "launch.demo", "--out", str(tmp_path / "bad"), "--steps", "12",
                        "train.hang_timeout_s=5"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, timeout=300)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr, p.stderr[-3000:]
    assert err[-2].startswith("config error: train.hang_timeout_s=5 must exceed"), err[-6:]
    assert err[-1].startswith("demo: stage failed (exit 1)"), err[-6:]


def test_shortened_video_demo_scores_extended_clips_against_held_out_truth(tmp_path):
    """`python -m launch.demo --video`, shortened: the one-frame model trains on 3-frame windows, and
    the eval service, the summary and the sampling CLI extend clips to the 8 frames they are scored on."""
    import numpy as np

    out = tmp_path / "vdemo"
    cmd = [sys.executable, "-m", "launch.demo", "--video", "--out", str(out), "--steps", "12", "--eval-samples", "4",
           f"eval.cache_dir={tmp_path / 'cache'}", "eval.reference_samples=8", "diffusion.sample_steps=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = str(out / "run-tiny_video")
    assert "2 rank(s) on cpu, ZeRO-2" in proc.stdout

    rows = {r["metric"]: r for r in eval_ledger.read(run) if r["step"] == 12}
    assert set(rows) == {"fvd", "frame_mse", "frame_accuracy"} and all(r["status"] == "ok" for r in rows.values())
    mse = rows["frame_mse"]
    assert len(mse["per_frame"]) == 6 and mse["clips"] == 4  # 8-frame clips from a 1-frame-at-a-time model
    assert mse["heldout_data"] == str(out / "data" / "moving_digits-heldout")
    final = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"final"')))["final"]
    assert final["frame_mse_repeat_last"] == mse["repeat_last"] and final["frame_mse_data_mean"] == mse["data_mean"]
    assert "final samples : per-frame MSE" in proc.stdout and "over 6 predicted frames" in proc.stdout

    npz = tmp_path / "clips.npz"
    p = subprocess.run([sys.executable, "-m", "rin_scale.sample", run, "--n", "3", "--steps", "2", "--out",
                        str(tmp_path / "clips.png"), "--npz", str(npz)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert np.load(npz)["arr_0"].shape == (3, 8, 16, 16, 3)  # 2 given + 6 predicted frames, NTHWC
