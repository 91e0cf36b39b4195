"""The eval service on real run directories: snapshots written by rundir.write_snapshot from fresh
tiny RINs, real WebDataset shards of the embedded data, TensorBoard events read back.

Stand-ins, because pretrained weights cannot be downloaded here: FVD uses a small TorchScript model
with StyleGAN-V's I3D interface (evals.extractors.StandinI3D), scripted and saved to a file and
loaded by torch.jit.load, the path that loads the real i3d_torchscript.pt. FID uses the real
InceptionV3 architecture (torch-fidelity's) with weights saved from a random initialisation to a
file, loaded through the path that loads torch-fidelity's released weights.
"""
import os
import shutil
import threading

import pytest
import torch

from rin_scale import rundir, storage
from rin_scale.config import dump_yaml, load_config
from test_evals_metrics import make_shards

from evals.extractors import save_random_inception, save_standin_i3d
from evals.ledger import append, read as ledger
from launch import status as launch_status
from evals.service import Service, main


def make_run(run: str, preset: str, overrides: list[str]):
    """RUN/config.yaml as the trainer writes it; returns (cfg, a fresh RIN)."""
    from rin_scale.model import RIN

    cfg = load_config(preset, [f"train.run_dir={run}"] + overrides)
    storage.write_bytes(storage.join(run, "config.yaml"), dump_yaml(cfg).encode())
    torch.manual_seed(0)
    return cfg, RIN(cfg.model)


def snapshot(run: str, cfg, model, step: int) -> str:
    return rundir.write_snapshot(run, step, model.state_dict(), cfg, {"images_seen": step * cfg.train.global_batch,
                                                                      "wall_time": float(step)})


def tb_scalars(logdir: str) -> dict:
    """{tag: [(step, value)]} read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    out = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    out["_images"] = acc.Tags()["images"]
    return out


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("evals-video")
    shards = make_shards(str(d / "clips"), "moving_digits", n=6, frames=8, shard_size=3)
    return {"shards": shards, "i3d": save_standin_i3d(str(d / "i3d_torchscript.pt")), "cache": str(d / "cache")}


def video_run(run, video_data, extra=()):
    cfg, model = make_run(run, "tiny_video", [
        f"data.shards={video_data['shards']}", f"eval.i3d_weights={video_data['i3d']}",
        f"eval.cache_dir={video_data['cache']}", "eval.num_samples=2", "eval.batch=2", "eval.steps=2",
        "eval.reference_samples=4", *extra])
    return run, cfg, model


def test_scores_each_snapshot_once_across_restarts_deletion_and_corruption(tmp_path, video_data, capfd):
    run, cfg, model = video_run(str(tmp_path / "run"), video_data)
    for step in (100, 200, 300):
        snapshot(run, cfg, model, step)
    assert main(["--run", run, "--once", "--quiet"]) == 0
    assert "CPU memory: glibc" in capfd.readouterr().err  # freed memory kept for reuse, as in the trainer
    rows = ledger(run)
    assert [(r["step"], r["metric"], r["status"]) for r in rows] == [(s, "fvd", "ok") for s in (100, 200, 300)]
    for r in rows:
        assert r["value"] >= 0 and r["samples"] == 2 and r["extractor"].startswith("i3d-torchscript-")
        assert r["images_seen"] == r["step"] * cfg.train.global_batch and r["sampler"] == "ddim" and r["steps"] == 2
    # The same snapshot weights and the same sampling noise give the same score.
    assert len({round(r["value"], 6) for r in rows}) == 1

    # A restart scores nothing again.
    assert main(["--run", run, "--once", "--quiet"]) == 0
    assert len(ledger(run)) == 3

    # A new snapshot is scored next; one still being written (no COMPLETE) is logged and skipped.
    snapshot(run, cfg, model, 400)
    partial = storage.join(run, "snapshots", rundir.step_name(500))
    os.makedirs(partial)
    capfd.readouterr()
    assert main(["--run", run, "--once", "--quiet"]) == 0
    assert [r["step"] for r in ledger(run)] == [100, 200, 300, 400]
    assert "step-000000500 has no COMPLETE marker" in capfd.readouterr().err

    # Retention deletes a snapshot after the service listed it: a row says so, no crash.
    snapshot(run, cfg, model, 600)
    snapshot(run, cfg, model, 700)
    svc = Service(run, progress=False)
    pending = svc.pending()
    assert [s for s, _ in pending] == [600, 700]
    shutil.rmtree(os.path.join(run, "snapshots", rundir.step_name(600)))
    # A corrupt weights file (truncated upload, bad disk) leaves a row too.
    with open(os.path.join(run, "snapshots", rundir.step_name(700), "ema.safetensors"), "wb") as f:
        f.write(b"\x00garbage")
    assert svc.run_once(pending) == 2
    tail = {r["step"]: r for r in ledger(run)[-2:]}
    assert tail[600]["status"] == "deleted" and tail[600]["value"] is None
    assert tail[700]["status"] == "corrupt" and "corrupt" in tail[700]["error"]
    # Neither is retried by the next service.
    assert Service(run, progress=False).run_once() == 0

    # TensorBoard: one FVD point per scored snapshot against its step, and the sample grid.
    tb = tb_scalars(os.path.join(run, "eval", "tb"))
    assert [s for s, _ in tb["eval/fvd"]] == [100, 200, 300, 400]
    assert "eval/samples" in tb["_images"]
    assert not os.listdir(os.path.join(run, "eval", "claims"))  # claims released


def test_two_services_do_not_score_the_same_snapshot(tmp_path, video_data):
    run, cfg, model = video_run(str(tmp_path / "run"), video_data)
    for step in (10, 20, 30, 40):
        snapshot(run, cfg, model, step)
    services = [Service(run, progress=False) for _ in range(2)]
    for s in services:  # reference statistics first, so that both race over the snapshots alone
        s.reference
    counts = [0, 0]

    def work(i):
        counts[i] = services[i].run_once()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = sorted(r["step"] for r in ledger(run))
    assert steps == [10, 20, 30, 40]
    assert sum(counts) == 4


def test_claims_block_others_until_stale(tmp_path, video_data):
    run, cfg, model = video_run(str(tmp_path / "run"), video_data, extra=["eval.claim_timeout=1000"])
    snapshot(run, cfg, model, 10)
    a, b = Service(run, progress=False), Service(run, progress=False)
    assert a.claim(10)
    assert not b.claim(10)
    assert b.run_once() == 0 and ledger(run) == []  # held by a (alive): left alone
    # a dies holding it; once the claim is older than eval.claim_timeout another service takes over.
    c = Service(run, ["eval.claim_timeout=0.01"], progress=False)
    assert c.run_once() == 1
    assert [r["step"] for r in ledger(run)] == [10]


def test_services_racing_for_one_chunk_never_both_win(tmp_path, video_data):
    """Claims raced at the same instant, round after round: exactly one service wins each. (A claim
    file seen between its creation and its body was once taken for a torn claim and taken over.)"""
    run, cfg, model = video_run(str(tmp_path / "run"), video_data)
    services = [Service(run, progress=False) for _ in range(4)]
    start = threading.Barrier(len(services))
    for round_ in range(60):
        won = [False] * len(services)

        def race(i):
            start.wait()
            won[i] = services[i].claim(10, f"-race-{round_}")

        threads = [threading.Thread(target=race, args=(i,)) for i in range(len(services))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(won) == 1, f"round {round_}: {sum(won)} services won one claim"


def test_newest_order_and_milestones(tmp_path, video_data):
    run, cfg, model = video_run(str(tmp_path / "run"), video_data, extra=["train.milestone_every=200"])
    for step in (100, 200, 300, 400):
        snapshot(run, cfg, model, step)
    assert [s for s, _ in Service(run, ["eval.order=newest"], progress=False).pending()] == [400, 300, 200, 100]
    assert [s for s, _ in Service(run, ["eval.order=milestones"], progress=False).pending()] == [200, 400]
    # Newest: the final snapshot is scored, the older unscored ones get a row saying they were skipped.
    assert main(["--run", run, "--once", "--quiet", "eval.order=newest"]) == 0
    assert [(r["step"], r["status"]) for r in ledger(run)] == [(100, "skipped"), (200, "skipped"),
                                                              (300, "skipped"), (400, "ok")]
    assert "step 400 was scored instead" in ledger(run)[0]["error"]


def test_bad_input_is_one_line(tmp_path, video_data, capsys):
    assert main(["--run", str(tmp_path / "nothing"), "--once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.yaml does not exist" in err[0]
    run, cfg, model = video_run(str(tmp_path / "run"), video_data, extra=[f"eval.i3d_weights={tmp_path}/missing.pt"])
    snapshot(run, cfg, model, 10)
    assert main(["--run", run, "--once", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error: eval.i3d_weights=" in err[-1] and "no such file" in err[-1]
    assert main(["--run", run, "--once", "--quiet", "eval.order=sideways"]) == 2
    assert "eval.order='sideways' is not one of" in capsys.readouterr().err
    assert main(["--run", run, "--once", "--quiet", f"eval.i3d_weights={video_data['i3d']}",
                 f"data.shards={tmp_path}/no-shards"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data.shards=") and "does not exist" in err[-1]


# --------------------------------------------------------------------------------------------
# Chunks: a snapshot's samples split among services (and the GPUs of one eval job)


def _chunk_files(run: str, step: int) -> dict:
    import glob

    names = glob.glob(os.path.join(run, "eval", "chunks", rundir.step_name(step), "*", "*.pt"))  # not .pt.tmp-*
    return {n: os.stat(n).st_mtime_ns for n in names}


def _count_chunks(monkeypatch) -> list:
    """The (start, stop) of every chunk this process samples."""
    calls, real = [], Service._evaluate

    def counted(self, step, model, dcfg, a, b):
        calls.append((a, b))
        return real(self, step, model, dcfg, a, b)

    monkeypatch.setattr(Service, "_evaluate", counted)
    return calls


def test_chunks_split_among_services_and_a_kill_loses_one_chunk(tmp_path, video_data, monkeypatch):
    import subprocess
    import sys
    import time

    extra = ["eval.num_samples=8", "eval.chunk=2"]
    values = {}
    for name in ("one", "2", "3", "killed"):
        run, cfg, model = video_run(str(tmp_path / name), video_data, extra)
        snapshot(run, cfg, model, 10)
    calls = _count_chunks(monkeypatch)

    # One service: 4 chunks of 2 samples, one row.
    assert main(["--run", str(tmp_path / "one"), "--once", "--quiet"]) == 0
    (row,) = ledger(str(tmp_path / "one"))
    assert (row["status"], row["samples"], row["chunks"]) == ("ok", 8, 4) and sorted(calls) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    values["one"] = row["value"]

    # Two, then three services at once: every chunk sampled once, one row, the same value to the last bit.
    for n in (2, 3):
        run, calls[:] = str(tmp_path / str(n)), []
        services = [Service(run, progress=False) for _ in range(n)]
        for s in services:
            s.reference
        threads = [threading.Thread(target=s.run_once) for s in services]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        (row,) = ledger(run)
        assert sorted(calls) == [(0, 2), (2, 4), (4, 6), (6, 8)] and row["value"] == values["one"], (n, calls)
        assert not _chunk_files(run, 10) and not os.listdir(os.path.join(run, "eval", "claims"))

    # A service killed (SIGKILL) after its first chunk: the next one scores only what was not finished.
    run, calls[:] = str(tmp_path / "killed"), []
    proc = subprocess.Popen([sys.executable, "-m", "evals.service", "--run", run, "--once", "--quiet"],
                            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))},
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _chunk_files(run, 10) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    done = _chunk_files(run, 10)
    assert 1 <= len(done) < 4 and ledger(run) == []
    assert main(["--run", run, "--once", "--quiet"]) == 0  # takes over the dead process's chunk claim
    assert len(calls) == 4 - len(done)
    (row,) = ledger(run)
    assert row["value"] == values["one"] and not os.path.exists(os.path.join(run, "eval", "chunks", "step-000000010"))


def test_a_snapshot_deleted_while_scored_gets_no_ok_row(tmp_path, video_data, monkeypatch):
    run, cfg, model = video_run(str(tmp_path / "run"), video_data)
    url = snapshot(run, cfg, model, 10)
    real = Service._evaluate

    def then_deleted(self, *a):
        out = real(self, *a)
        shutil.rmtree(url)  # retention, while the samples were scored
        return out

    monkeypatch.setattr(Service, "_evaluate", then_deleted)
    assert main(["--run", run, "--once", "--quiet"]) == 0  # retention is not a failure
    (row,) = ledger(run)
    assert row["status"] == "deleted" and row["value"] is None and "deleted while being scored" in row["error"]


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("evals-image")
    return {"shards": make_shards(str(d / "digits"), "digits", n=120),
            "inception": save_random_inception(str(d / "inception-random.pth")), "cache": str(d / "cache")}


def test_fid_and_class_accuracy_for_a_class_conditional_model(tmp_path, image_data):
    run = str(tmp_path / "run")
    cfg, model = make_run(run, "tiny", [
        f"data.shards={image_data['shards']}", f"eval.classifier_data={image_data['shards']}",
        f"eval.inception_weights={image_data['inception']}", f"eval.cache_dir={image_data['cache']}",
        "eval.num_samples=4", "eval.batch=4", "eval.steps=2", "eval.reference_samples=4"])
    snapshot(run, cfg, model, 250)
    assert main(["--run", run, "--once", "--quiet"]) == 0
    rows = {r["metric"]: r for r in ledger(run)}
    assert set(rows) == {"fid", "class_accuracy", "domain_fid", "laplacian_ratio"}  # + evals.digits_cnn
    fid, acc = rows["fid"], rows["class_accuracy"]
    assert fid["status"] == "ok" and fid["value"] > 0 and fid["samples"] == 4 and fid["reference_samples"] == 4
    assert fid["extractor"].startswith("inception-v3-2015-12-05-")
    # An untrained model's samples are noise: the classifier cannot find their classes (10 classes).
    assert 0 <= acc["value"] <= 0.5 and acc["step"] == 250
    assert acc["classifier_real_accuracy"] > 0.8  # the classifier itself works on real digits
    tb = tb_scalars(os.path.join(run, "eval", "tb"))
    assert [s for s, _ in tb["eval/fid"]] == [250] and [s for s, _ in tb["eval/class_accuracy"]] == [250]
    # The reference statistics were cached under eval.cache_dir, keyed by data and extractor.
    cached = os.listdir(os.path.join(image_data["cache"], "reference"))
    assert len(cached) == 1 and cached[0].startswith("fid-")
    # Weights full of NaN sample NaNs, which as uint8 images would be black and get a FID: an error row.
    rundir.write_snapshot(run, 500, {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()},
                          cfg, {"images_seen": 0})
    assert main(["--run", run, "--once", "--quiet"]) == 1  # a snapshot failed: --once says so
    last = ledger(run)[-1]
    assert (last["step"], last["metric"], last["status"], last["value"]) == (500, "fid", "error", None)


def test_a_run_in_a_bucket(gcs_bucket, video_data, tmp_path):
    """RUN on gs:// (fake-gcs-server standing in for Google Cloud Storage): exclusive claims, the
    ledger and TensorBoard events copied into the bucket."""
    import fsspec

    run = f"{gcs_bucket}/runs/v"
    _, cfg, model = video_run(run, video_data)
    snapshot(run, cfg, model, 100)
    a, b = Service(run, progress=False), Service(run, progress=False)
    assert a.claim(100) and not b.claim(100)
    a.release(100)
    assert main(["--run", run, "--once", "--quiet"]) == 0
    assert [(r["step"], r["status"]) for r in ledger(run)] == [(100, "ok")]
    fs = fsspec.filesystem("gs", token="anon", skip_instance_cache=True)
    # One object per ledger row: services adding rows at once cannot drop each other's.
    (row,) = fs.ls(f"{run[5:]}/eval/ledger")
    assert row.rsplit("/", 1)[-1].startswith(f"{rundir.step_name(100)}-fvd-")
    assert not fs.exists(f"{run[5:]}/eval/ledger.jsonl")
    writers = [threading.Thread(target=lambda o: [append(run, {"step": s, "metric": "fvd", "status": "ok"}, o)
                                                  for s in range(200, 210)], args=(o,)) for o in ("a", "b")]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    assert len(ledger(run)) == 21
    assert launch_status.status(run)["newest_eval"]["step"] == 209
    events = fs.ls(f"{run[5:]}/eval/tb")
    assert events and any("tfevents" in e for e in events)
    local = tmp_path / "tb"
    local.mkdir()
    for e in events:
        fs.get(e, str(local / e.rsplit("/", 1)[-1]))
    assert [s for s, _ in tb_scalars(str(local))["eval/fvd"]] == [100]


def _claim_file(run, step, **body):
    storage.write_json(storage.join(run, "eval", "claims", f"{rundir.step_name(step)}.json"), body)


def test_claims_of_dead_services_are_taken_over(tmp_path, video_data):
    import json
    import socket
    import subprocess
    import sys
    import time

    run, cfg, model = video_run(str(tmp_path / "run"), video_data)  # eval.claim_timeout: 2 h
    for step in (10, 20, 30):
        snapshot(run, cfg, model, step)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    # Killed mid-scoring on this host: its pid is gone, so the claim is taken over at once.
    _claim_file(run, 10, owner="killed", host=host, pid=dead.pid, time=time.time())
    # Killed on another host: its heartbeat stopped 10 minutes ago.
    _claim_file(run, 20, owner="elsewhere", host="other-node", pid=1, time=time.time() - 600)
    # Alive on another host, heartbeat fresh: left to it.
    _claim_file(run, 30, owner="busy", host="other-node", pid=1, time=time.time())
    assert main(["--run", run, "--once", "--quiet"]) == 0
    assert [r["step"] for r in ledger(run)] == [10, 20]
    claims = os.path.join(run, "eval", "claims")
    assert os.listdir(claims) == [f"{rundir.step_name(30)}.json"]
    assert json.load(open(os.path.join(claims, os.listdir(claims)[0])))["owner"] == "busy"


def test_the_claim_heartbeat_is_renewed_while_scoring(tmp_path, video_data):
    import time

    run, cfg, model = video_run(str(tmp_path / "run"), video_data, extra=["eval.claim_timeout=0.4"])
    snapshot(run, cfg, model, 10)
    a, b = Service(run, progress=False), Service(run, progress=False)
    assert a.claim(10)
    url = storage.join(run, "eval", "claims", f"{rundir.step_name(10)}.json")
    with a.holding(10):
        first = storage.read_json(url)["time"]
        time.sleep(0.6)  # longer than the claim lives without its heartbeat (0.1 s beats)
        assert storage.read_json(url)["time"] > first
        assert not b.claim(10)  # alive: same host, our pid, a fresh heartbeat
    assert not storage.exists(url)  # released at the end


def test_once_fails_in_one_line_when_a_snapshot_fails(tmp_path, video_data, capsys, monkeypatch):
    run, cfg, model = video_run(str(tmp_path / "run"), video_data)
    snapshot(run, cfg, model, 10)

    def broken(self, *a):
        raise RuntimeError("sampler exploded\nsecond line")

    monkeypatch.setattr(Service, "_evaluate", broken)
    assert main(["--run", run, "--once", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: 1 snapshot(s) failed to score (0 ledger row(s) written); "
                       "step 10: RuntimeError: sampler exploded")
    assert ledger(run) == [] and not os.listdir(os.path.join(run, "eval", "claims"))


def test_non_finite_weights_samples_or_features_give_error_rows(tmp_path, video_data, capfd):
    import math

    run, cfg, model = video_run(str(tmp_path / "run"), video_data)
    snapshot(run, cfg, model, 10)
    broken = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    rundir.write_snapshot(run, 20, broken, cfg, {"images_seen": 0})
    # --once exits non-zero after writing an error row; NaN weights are found when loaded, before sampling.
    assert main(["--run", run, "--once", "--quiet"]) == 1
    err = capfd.readouterr().err
    assert "step 20: chunk" not in err and "step 10: chunk" in err
    assert err.strip().splitlines()[-1].startswith("error: 1 snapshot(s) failed to score (2 ledger row(s) written)")
    rows = {r["step"]: r for r in ledger(run)}
    assert rows[10]["status"] == "ok" and rows[10]["precision"] in ("bf16", "fp32")  # what the scoring ran in
    assert rows[20]["status"] == "error" and rows[20]["value"] is None and "non-finite weights" in rows[20]["error"]
    svc = Service(run, progress=False)
    # Finite samples, but an extractor that gives NaNs: an error row too, not a score.
    snapshot(run, cfg, model, 30)
    svc.extractor.net.forward = lambda x: torch.full((x.shape[0], 400), math.nan)
    assert svc.run_once() == 1
    last = ledger(run)[-1]
    assert (last["step"], last["status"]) == (30, "error") and "non-finite features" in last["error"]
    assert Service(run, progress=False).run_once() == 0  # not retried


def _adm_reader(path: str, name: str):
    """What ADM's evaluator (guided-diffusion evaluations/evaluator.py) does with a sample batch:
    open `name`.npy inside the zip, read the .npy header, then stream the rows."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path, "r") as z, z.open(f"{name}.npy", "r") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        assert not fortran and not dtype.hasobject  # ADM's streaming reader
        return np.frombuffer(f.read(), dtype=dtype).reshape(shape)


def test_the_scored_samples_export_as_adm_npz_equal_to_rin_sample(tmp_path, image_data):
    import numpy as np

    from evals.export import main as export_main
    from rin_scale.sample import main as sample_main

    run = str(tmp_path / "run")
    cfg, model = make_run(run, "tiny", [
        f"data.shards={image_data['shards']}", f"eval.inception_weights={image_data['inception']}",
        f"eval.cache_dir={image_data['cache']}", "eval.num_samples=6", "eval.batch=2", "eval.chunk=4",
        "eval.steps=2", "eval.sampler=ddpm", "eval.reference_samples=4", "eval.keep_samples=true"])
    snapshot(run, cfg, model, 10)
    assert main(["--run", run, "--once", "--quiet"]) == 0
    scored = str(tmp_path / "scored.npz")
    assert export_main([run, "--step", "10", "--out", scored]) == 0
    # The same samples from rin_scale.sample: chunks, noise per sample index, labels i mod 10.
    direct = str(tmp_path / "direct.npz")
    assert sample_main([run, "--n", "6", "--chunk", "4", "--batch", "2", "--steps", "2", "--sampler", "ddpm",
                        "--seed", str(cfg.train.seed), "--npz", direct, "--out", str(tmp_path / "grid.png")]) == 0
    for path in (scored, direct):
        x, y = _adm_reader(path, "arr_0"), _adm_reader(path, "arr_1")
        assert x.dtype == np.uint8 and x.shape == (6, 16, 16, 3) and x.max() > x.min()
        assert y.tolist() == [0, 1, 2, 3, 4, 5]
        with np.load(path) as z:
            assert z.files == ["arr_0", "arr_1"] and np.array_equal(z["arr_0"], x)
    assert np.array_equal(_adm_reader(scored, "arr_0"), _adm_reader(direct, "arr_0"))


def test_the_trainer_keeps_snapshots_until_the_eval_service_scores_them(tmp_path, image_data):
    from test_train import train

    run = str(tmp_path / "run")
    cfg = ["train.global_batch=8", "train.snapshot_every=2", "train.state_every=2", "train.sample_every=0",
           "train.keep_last=1", "eval.keep_unscored=2", f"eval.inception_weights={image_data['inception']}",
           f"eval.cache_dir={image_data['cache']}", "eval.num_samples=2", "eval.batch=2", "eval.steps=2",
           "eval.reference_samples=4", "data.workers=2"]
    train(run, 1, *cfg, "train.total_steps=2", shards=image_data["shards"])
    svc = Service(run, progress=False)  # started, but slower than the trainer: nothing scored yet

    def kept():
        return [s for s, _ in rundir.list_complete(run, "snapshots")]

    # keep_last=1, yet no unscored snapshot is deleted while the budget (eval.keep_unscored=2) holds.
    proc = train(run, 1, *cfg, "train.total_steps=6", shards=image_data["shards"])
    assert kept() == [2, 4, 6] and "eval.keep_unscored" not in proc.stdout + proc.stderr
    # Past the budget: the oldest unscored goes, with one warning and a ledger row saying why.
    proc = train(run, 1, *cfg, "train.total_steps=10", shards=image_data["shards"])
    assert kept() == [6, 8, 10]
    warnings = [l for l in (proc.stdout + proc.stderr).splitlines() if "eval.keep_unscored=2" in l]
    assert len(warnings) == 1 and "deleting the oldest unscored (2)" in warnings[0]  # then 4, without a 2nd
    assert [(r["step"], r["status"]) for r in ledger(run)] == [(2, "skipped"), (4, "skipped")]
    assert "eval.keep_unscored=2" in ledger(run)[0]["error"]
    # Once scored, they go as keep_last says.
    assert svc.run_once() == 3
    train(run, 1, *cfg, "train.total_steps=12", shards=image_data["shards"])
    assert kept() == [12]


# --------------------------------------------------------------------------------------------
# Digit-domain metrics (evals.digits_cnn): a CNN trained on the real training digits


@pytest.fixture(scope="module")
def digit_splits(tmp_path_factory):
    d = tmp_path_factory.mktemp("evals-domain")
    return {"train": make_shards(str(d / "train"), "digits", 300, split="train"),
            "heldout": make_shards(str(d / "heldout"), "digits", 100),
            "inception": save_random_inception(str(d / "inception-random.pth")), "cache": str(d / "cache")}


def test_the_digits_cnn_is_deterministic_and_its_metrics_track_quality(digit_splits):
    import torch.nn.functional as F

    from evals import digits_cnn
    from rin_scale.config import ModelConfig

    m = ModelConfig(image_size=16, channels=3)
    x, y = digits_cnn.load_images(digit_splits["train"], m)
    a, b = digits_cnn.train_cnn(x, y, epochs=2), digits_cnn.train_cnn(x, y, epochs=2)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())  # bit-identical

    dom = digits_cnn.domain_reference(digit_splits["train"], digit_splits["heldout"], m, digit_splits["cache"],
                                      progress=False)
    assert dom.n == 300 and dom.floor_n == 100 and dom.id.startswith("digits-cnn-v1-")
    assert dom.heldout_accuracy > 0.9  # it knows the digits
    xh, _ = digits_cnn.load_images(digit_splits["heldout"], m)

    def score(imgs):
        s = digits_cnn.DomainScore(dom)
        s.update(imgs)
        return s.result()

    real = score(xh)
    assert real["domain_fid"] == pytest.approx(dom.floor, rel=1e-9) and real["laplacian_ratio"] == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(0)
    noisy = score((xh + 0.3 * torch.randn(xh.shape, generator=gen)).clamp(-1, 1))
    blurred = score(F.avg_pool2d(xh, 3, stride=1, padding=1, count_include_pad=False))
    upside_down = score(torch.flip(xh, dims=(2,)))
    assert noisy["laplacian_ratio"] > 1.5 and blurred["laplacian_ratio"] < 0.8
    assert upside_down["domain_fid"] > 3 * dom.floor and upside_down["laplacian_ratio"] == pytest.approx(1.0, abs=0.01)
    assert noisy["domain_fid"] > dom.floor and blurred["domain_fid"] > dom.floor

    # Cached, keyed by the data: a plain state dict read back with weights_only=True, the same network.
    files = sorted(os.listdir(os.path.join(digit_splits["cache"], "digits_cnn")))
    assert len(files) == 2 and files[0] == f"{dom.id}.pt" and files[1].startswith("reference-")  # + the statistics
    saved = torch.load(os.path.join(digit_splits["cache"], "digits_cnn", files[0]), weights_only=True)
    assert all(torch.equal(v, saved["state_dict"][k]) for k, v in dom.net.state_dict().items())
    net, net_id = digits_cnn.get_cnn(digit_splits["train"], m, digit_splits["cache"], progress=False)
    assert net_id == dom.id


def test_domain_fid_floor_and_laplacian_ratio_rows_for_digits(tmp_path, digit_splits):
    run = str(tmp_path / "run")
    cfg, model = make_run(run, "tiny", [
        f"data.shards={digit_splits['train']}", f"eval.classifier_data={digit_splits['heldout']}",
        f"eval.inception_weights={digit_splits['inception']}", f"eval.cache_dir={digit_splits['cache']}",
        "eval.num_samples=20", "eval.batch=10", "eval.steps=2", "eval.reference_samples=10"])
    snapshot(run, cfg, model, 250)
    assert main(["--run", run, "--once", "--quiet"]) == 0
    rows = {r["metric"]: r for r in ledger(run)}
    assert set(rows) == {"fid", "class_accuracy", "domain_fid", "laplacian_ratio"}
    dom, lap = rows["domain_fid"], rows["laplacian_ratio"]
    assert dom["status"] == "ok" and dom["samples"] == 20 and dom["extractor"].startswith("digits-cnn-v1-")
    assert 0 < dom["floor"] < dom["value"] and dom["floor_samples"] == 100 and dom["reference_samples"] == 300
    # An untrained model samples noise: far from the digits, and much rougher than them.
    assert dom["value"] > 3 * dom["floor"] and lap["value"] > 2 and lap["real_laplacian"] > 0
    tb = tb_scalars(os.path.join(run, "eval", "tb"))
    for tag in ("eval/domain_fid", "eval/domain_fid_floor", "eval/laplacian_ratio"):
        assert [s for s, _ in tb[tag]] == [250], tag
    assert [v for _, v in tb["eval/domain_fid_floor"]] == [pytest.approx(dom["floor"], rel=1e-5)]
    # The next snapshot (and the next service) reuses the cached CNN and floor: same floor, same extractor.
    snapshot(run, cfg, model, 500)
    assert main(["--run", run, "--once", "--quiet"]) == 0
    again = [r for r in ledger(run) if r["metric"] == "domain_fid"]
    assert [r["step"] for r in again] == [250, 500] and again[1]["floor"] == dom["floor"]
    assert again[1]["extractor"] == dom["extractor"] and again[1]["value"] == pytest.approx(dom["value"])
    assert len(os.listdir(os.path.join(digit_splits["cache"], "digits_cnn"))) == 2  # weights and statistics
