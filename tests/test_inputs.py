"""Inputs that used to break things (#13 §5): each gets one clear line, or is handled, and loses nothing.

Labels beyond the model's classes, a truncated tar without a manifest, a YAML file given to
rin_scale.info, secrets inside URLs, launch.submit with unusable data.shards, and rin_scale.sample
with bad numbers or an output folder that does not exist yet. The CLIs run for real (subprocess,
or their main(argv)); a one-line error means rc != 0, one line on stderr, no traceback.
"""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml
from PIL import Image

from data_tools.embedded import digits
from data_tools.shard import make_shards
from launch import submit as launch_submit
from rin_scale import rundir, storage
from rin_scale.config import dump_yaml, load_config
from rin_scale.data import DataError, ShardLoader
from rin_scale.shards import list_shards, tar_bytes

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
OPTS = {"kind": "image", "shard_size": 30, "shard_bytes": 0, "resize": 0, "format": None,
        "clip_frames": 0, "frame_stride": 1, "source": "test"}


def cli(module, *args, timeout=300):
    return subprocess.run([PY, "-m", module, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(p, rc=None):
    """The stderr of a CLI that stopped with one line; returns that line."""
    assert p.returncode != 0 and (rc is None or p.returncode == rc), (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return lines[-1]


def png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """60 held-out digits, labels 0..9, in 2 shards of 30 with a manifest listing 10 classes."""
    out = str(tmp_path_factory.mktemp("labelled") / "digits")
    items = [(f"embedded:{n}", a, y) for n, a, y in list(digits("heldout"))[:60]]
    make_shards(items, out, OPTS, [str(i) for i in range(10)], workers=1, progress=False)
    return out


def loader_cfg(shards, *over):
    return load_config("tiny", [f"data.shards={shards}", "data.workers=0", "data.shuffle_buffer=1", *over])


def one_epoch(cfg, batch=4):
    loader = ShardLoader(cfg.data, cfg.model, batch)
    labels, keys = [], []
    for b in loader:
        labels += b["label"].tolist()
        keys += b["key"]
        if loader.position == len(loader):
            return loader, labels, keys


# --------------------------------------------------------------------------------------------
# Labels against the model's classes


def test_more_classes_than_the_model_has_stop_the_trainer_at_start_up_in_one_line(labelled, tmp_path):
    cfg = loader_cfg(labelled, "model.num_classes=5")
    with pytest.raises(DataError) as e:
        ShardLoader(cfg.data, cfg.model, 4)
    msg = str(e.value)
    assert "10 classes" in msg and "model.num_classes=5" in msg and "set model.num_classes=10" in msg
    # the real trainer: one line before step 1 (was: IndexError at step 1, a device assert on a GPU)
    p = cli("rin_scale.train", "tiny", f"data.shards={labelled}", f"train.run_dir={tmp_path}/run",
            "model.num_classes=5", "data.workers=0", "train.global_batch=4", "train.sample_every=0")
    line = one_line_error(p)
    assert line.startswith("[train] stopped: ") and "set model.num_classes=10" in line
    assert not os.path.exists(f"{tmp_path}/run/train_log.jsonl")


def test_a_conditional_model_on_a_manifest_without_classes_stops_at_start_up(tmp_path):
    out = str(tmp_path / "flat")
    make_shards([(f"embedded:{n}", a, None) for n, a, _ in list(digits("heldout"))[:20]], out, OPTS, [],
                workers=1, progress=False)
    with pytest.raises(DataError, match=r"model.num_classes=10 but the manifest .* lists no classes.*"
                                        r"model.num_classes=0"):
        cfg = loader_cfg(out)
        ShardLoader(cfg.data, cfg.model, 4)
    cfg = loader_cfg(out, "model.num_classes=0")  # unconditional: the same data trains
    assert one_epoch(cfg)[0].stats["errors"] == 0


@pytest.mark.parametrize("manifest", ["none", "without classes"])
def test_a_label_outside_the_models_classes_is_a_sample_error_never_reaching_the_model(tmp_path, manifest):
    samples = []
    for i, (name, arr, y) in enumerate(list(digits("heldout"))[:20]):
        cls = {3: 7, 11: 5}.get(i, y % 5)  # 7: beyond model.num_classes=5; 5: == num_classes ("no label")
        samples.append({"__key__": f"s{i:03d}", "png": png(arr), "cls": str(cls).encode()})
    (tmp_path / "data-000000.tar").write_bytes(tar_bytes(samples))
    if manifest == "without classes":
        (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"name": "data-000000.tar", "samples": 20}]}))
    cfg = loader_cfg(str(tmp_path), "model.num_classes=5")
    loader, labels, keys = one_epoch(cfg)
    assert loader.stats["errors"] == 2 and loader.stats["samples"] == 20
    assert len(labels) == 20 and all(0 <= y < 5 for y in labels)
    assert "s003" not in keys and "s011" not in keys  # stood in for by the previous good sample
    # an unconditional model ignores labels: nothing is an error
    loader, _, keys = one_epoch(loader_cfg(str(tmp_path), "model.num_classes=0"))
    assert loader.stats["errors"] == 0 and {"s003", "s011"} <= set(keys)


# --------------------------------------------------------------------------------------------
# A folder without a manifest and one damaged tar


def test_a_truncated_tar_without_a_manifest_is_one_data_error_naming_it(labelled, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(labelled, bad, ignore=shutil.ignore_patterns("*.json"))
    tar = bad / "data-000001.tar"
    whole = tar.read_bytes()
    with tarfile.open(tar) as tf:
        member = tf.getmembers()[30]  # the first member of sample 10 (cls, json, png)
    cfg = loader_cfg(str(bad), "model.num_classes=10")
    assert ShardLoader(cfg.data, cfg.model, 4).total == 60  # whole: fine
    for cut, what in [(member.offset_data + 10, "tarfile error"),
                      (member.offset + 100, "truncated after 10 samples: no end-of-archive blocks"),
                      (member.offset, "truncated after 10 samples: no end-of-archive blocks")]:  # a 512-byte boundary
        tar.write_bytes(whole[:cut])
        with pytest.raises(DataError) as e:
            ShardLoader(cfg.data, cfg.model, 4)
        msg = str(e.value)
        assert f"{tar} is not a readable tar" in msg and "\n" not in msg, (cut, msg)
        if what != "tarfile error":
            assert what in msg, (cut, msg)
    # the counts alone, as data_tools.check asks for them, still read the shorter tar
    tar.write_bytes(whole[:member.offset + 100])
    assert list_shards(str(bad))[1] == [30, 10]


# --------------------------------------------------------------------------------------------
# rin_scale.info takes what the trainer takes


def test_info_takes_a_preset_yaml_files_and_overrides_like_the_trainer(tmp_path, capsys):
    from rin_scale.info import main as info_main

    good = tmp_path / "run.yaml"
    good.write_text("preset: cifar10\nmodel:\n  image_size: 64\n  num_blocks: 2\n")
    assert info_main([str(good), "latent_dim=256"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["preset"], out["image_size"], out["num_blocks"], out["latent_dim"]) == ("cifar10", 64, 2, 256)
    assert info_main(["tiny", str(good), "model.image_size=32"]) == 0  # the file's preset replaces tiny
    assert json.loads(capsys.readouterr().out)["image_size"] == 32
    assert info_main([]) == 0 and json.loads(capsys.readouterr().out)["preset"] == "tiny"

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  image_size: [64\n")
    p = cli("rin_scale.info", "tiny", str(bad))
    line = one_line_error(p, rc=2)
    assert p.stdout == "" and line.startswith("error: config file") and "not valid YAML" in line
    for argv, needle in [([str(tmp_path / "missing.yaml")], "does not exist"), (["nopreset"], "unknown preset"),
                         (["tiny", "model.nokey=1"], "unknown config key"), (["--n", "3"], "unknown option")]:
        assert info_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, (argv, err)


# --------------------------------------------------------------------------------------------
# Secrets inside URLs


SECRET_URLS = [
    "https://user:SECRET1@example.com/x?token=SECRET2",
    "https://storage.googleapis.com/b/d/{000..009}.tar?X-Goog-Algorithm=GOOG4-RSA-SHA256"
    "&X-Goog-Credential=SECRET3&X-Goog-Date=20240101T000000Z&X-Goog-Expires=600&X-Goog-Signature=SECRET4",
    "https://b.s3.amazonaws.com/d.tar?AWSAccessKeyId=SECRET5&Expires=1700000000&Signature=SECRET6",
    "https://acct.blob.core.windows.net/c/d.tar?sv=2022-11-02&se=2024-01-01&sp=r&sig=SECRET7",
]


def test_secrets_in_urls_are_masked_in_config_yaml_and_the_dry_run(tmp_path):
    for url, secrets in zip(SECRET_URLS, [2, 2, 2, 1]):
        text = dump_yaml(load_config("tiny", [f"data.shards={url}", f"eval.reference={url}"]))
        assert "SECRET" not in text, text
        shards = yaml.safe_load(text)["data"]["shards"]
        assert shards.count("***") == secrets and shards.split("?")[0].split("@")[-1] == url.split("?")[0].split("@")[-1]
    masked = yaml.safe_load(dump_yaml(load_config("tiny", [f"data.shards={SECRET_URLS[3]}"])))["data"]["shards"]
    assert masked == "https://acct.blob.core.windows.net/c/d.tar?sv=2022-11-02&se=2024-01-01&sp=r&sig=***"
    plain = "gs://bucket/shards/{000000..000009}.tar"
    assert yaml.safe_load(dump_yaml(load_config("tiny", [f"data.shards={plain}"])))["data"]["shards"] == plain
    # a URL read back from a saved config.yaml says why it cannot be used
    with pytest.raises(DataError, match=r"masked secret .*data.shards=URL"):
        list_shards(masked)

    p = cli("rin_scale.train", "tiny", f"data.shards={SECRET_URLS[0]}", "--dry-run")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "SECRET" not in p.stdout + p.stderr
    assert "shards: https://user:***@example.com/x?token=***" in p.stdout


# --------------------------------------------------------------------------------------------
# launch.submit checks data.shards before the job waits in the queue


def test_submit_checks_data_shards_before_the_job_is_queued(labelled, tmp_path, capsys):
    base = ["tiny", "--executor", "local", "--tasks-per-node", "2"]
    cases = [([], "data.shards is empty"),
             ([f"data.shards={tmp_path}/nowhere"], "does not exist"),
             ([f"data.shards={labelled}", "model.num_classes=5"], "set model.num_classes=10"),
             ([f"data.shards={labelled}", "train.global_batch=128"], "60 samples: too few for 2 rank(s) x batch 64")]
    for i, (extra, needle) in enumerate(cases):
        run = str(tmp_path / f"run{i}")
        extra = [f"train.run_dir={run}", *extra]
        assert launch_submit.main(base + extra) == 2, extra
        cap = capsys.readouterr()
        err = cap.err.strip()
        assert cap.out == "" and err.startswith("error: ") and needle in err and "\n" not in err, (extra, err)
        assert not os.path.exists(run)  # nothing submitted, no submitit folder, no launch.jsonl
        # --dry-run still prints the script and config, with the problem as one warning line
        assert launch_submit.main(base + extra + ["--dry-run"]) == 0
        cap = capsys.readouterr()
        assert "# ---- resolved config ----" in cap.out
        assert cap.err.strip().startswith("warning: ") and needle in cap.err and cap.err.count("\n") == 1
    # good data: no warning
    base += [f"train.run_dir={tmp_path}/run", "train.global_batch=8"]
    assert launch_submit.main(base + [f"data.shards={labelled}", "--dry-run"]) == 0
    assert capsys.readouterr().err == ""
    # a path only the nodes see: the check can be skipped
    assert launch_submit.main(base + [f"data.shards={tmp_path}/nowhere", "--skip-data-check", "--dry-run"]) == 0
    assert capsys.readouterr().err == ""


def test_submit_does_not_block_on_storage_it_cannot_reach(monkeypatch):
    from rin_scale.config import load_config as load
    from conftest import free_port

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setattr(storage, "_FS_CACHE", {})  # a filesystem made for another emulator must not be reused
    cfg = load("tiny", ["data.shards=gs://bucket/shards"])
    warning = launch_submit.check_data(cfg, 1, timeout=1.0)  # gcsfs would retry for 20 s
    assert warning == ("data.shards=gs://bucket/shards not checked: no listing within 1 s from here; "
                       "the job checks it when it starts")
    # refused at once: the storage error, in one line, secrets masked; the submit goes ahead
    url = f"https://user:SECRET@127.0.0.1:{free_port()}/shards?token=SECRET"
    warning = launch_submit.check_data(load("tiny", [f"data.shards={url}"]), 1)
    assert warning.startswith("data.shards=https://user:***@127.0.0.1:") and "?token=*** not checked: listing it " \
        "from here failed (ClientConnectorError: Cannot connect" in warning and "SECRET" not in warning, warning
    # the trainer's loader: the same failure is a DataError (one line: "[train] stopped: ..."), not a traceback
    cfg = loader_cfg(url)
    with pytest.raises(DataError, match=r"^cannot list the shards at https://user:\*\*\*@.*ClientConnectorError") as e:
        ShardLoader(cfg.data, cfg.model, 4)
    assert "\n" not in str(e.value) and "SECRET" not in str(e.value)


# --------------------------------------------------------------------------------------------
# rin_scale.sample: numbers checked up front, the output folder before sampling


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    import torch

    from rin_scale.model import RIN

    run = str(tmp_path_factory.mktemp("sample") / "run")
    cfg = load_config("tiny", [f"train.run_dir={run}", "model.image_size=8", "model.latent_dim=64",
                               "model.interface_dim=64", "model.latent_heads=4", "model.read_write_heads=4",
                               "model.num_latents=8", "model.num_classes=3"])
    torch.manual_seed(0)
    return rundir.write_snapshot(run, 10, RIN(cfg.model).state_dict(), cfg, {"images_seen": 0})


def test_sample_refuses_bad_numbers_in_one_line_before_loading_anything(tmp_path, capsys):
    from rin_scale.sample import main as sample_main

    p = cli("rin_scale.sample", str(tmp_path / "no-run"), "--n", "-1")
    line = one_line_error(p, rc=2)
    assert p.stderr.count("\n") == 1 and line == "python -m rin_scale.sample: error: argument --n: -1 must be at least 0"
    for args, needle in [(["--batch", "0"], "argument --batch: 0 must be at least 1"),
                         (["--steps", "-1"], "argument --steps: -1 must be at least 1"),
                         (["--zoom", "0"], "argument --zoom: 0 must be at least 1"),
                         (["--guidance", "-1"], "argument --guidance: -1.0 must be 0 or more"),
                         (["--batch", "x"], "argument --batch: 'x' is not an integer")]:
        with pytest.raises(SystemExit) as e:
            sample_main([str(tmp_path / "no-run"), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and needle in err, (args, err)


def test_sample_refuses_guidance_for_a_model_trained_without_label_dropout(snapshot, tmp_path, capsys):
    """The tiny preset trains without label dropout (the demo scores samples without guidance): its
    null class was never trained, so --guidance is refused in one line, before any sampling."""
    from rin_scale.sample import main as sample_main

    assert sample_main([snapshot, "--guidance", "1", "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --guidance 1.0:") and "model.class_dropout=0" in err and "\n" not in err, err
    assert not (tmp_path / "g.png").exists()


def test_sample_creates_the_output_folders_and_checks_them_before_sampling(snapshot, tmp_path, capsys):
    import numpy as np

    from rin_scale.sample import main as sample_main

    out, npz = tmp_path / "a" / "b" / "grid.png", tmp_path / "c" / "s.npz"
    assert sample_main([snapshot, "--n", "3", "--steps", "2", "--batch", "2", "--out", str(out),
                        "--npz", str(npz), "--device", "cpu"]) == 0
    assert Image.open(out).size[0] > 8 and np.load(npz)["arr_0"].shape == (3, 8, 8, 3)
    capsys.readouterr()
    (tmp_path / "file").write_text("")
    for bad, needle in [(tmp_path / "a", "is a folder"), (tmp_path / "file" / "grid.png", "cannot create its folder")]:
        assert sample_main([snapshot, "--steps", "2", "--out", str(bad), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        # no "[sample] ... samples on cpu" line: refused before sampling
        assert err.startswith("error: --out ") and needle in err and "\n" not in err, err


def test_sample_takes_a_class_name_from_the_runs_manifest(snapshot, tmp_path, capsys):
    """--class NAME: the index of NAME in the manifest of the run's data.shards (RUN/config.yaml)."""
    import numpy as np

    from rin_scale.sample import main as sample_main

    shards = tmp_path / "animals"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"kind": "image", "classes": ["cat", "dog", "fox"],
                                                      "shards": []}))
    run = snapshot.split("/snapshots/")[0]
    cfg = load_config("tiny", [f"train.run_dir={run}", f"data.shards={shards}", "model.image_size=8",
                               "model.latent_dim=64", "model.interface_dim=64", "model.latent_heads=4",
                               "model.read_write_heads=4", "model.num_latents=8", "model.num_classes=3"])
    storage.write_bytes(f"{run}/config.yaml", dump_yaml(cfg).encode())
    try:
        npz = tmp_path / "fox.npz"
        for source in (run, snapshot):
            assert sample_main([source, "--class", "fox", "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png"),
                                "--npz", str(npz), "--device", "cpu"]) == 0
            assert np.load(npz)["arr_1"].tolist() == [2, 2]
        capsys.readouterr()
        assert sample_main([snapshot, "--class", "wolf", "--out", str(tmp_path / "w.png"), "--device", "cpu"]) == 2
        assert capsys.readouterr().err == (f"error: --class wolf: not a class of {shards}: use one of cat, dog, fox "
                                           f"(or an index 0..2)\n")
        assert sample_main([snapshot, "--class", "5", "--out", str(tmp_path / "w.png"), "--device", "cpu"]) == 2
        assert capsys.readouterr().err == "error: --class 5: the model has 3 classes (0..2)\n"
        assert not (tmp_path / "w.png").exists()
    finally:
        os.remove(f"{run}/config.yaml")  # the module's snapshot stays as the other tests know it


def test_the_error_rate_help_says_from_which_sample_it_applies():
    import dataclasses

    from rin_scale.config import DataConfig
    from rin_scale.data import MIN_SAMPLES_FOR_RATE

    help_text = next(f.metadata["help"] for f in dataclasses.fields(DataConfig) if f.name == "max_error_rate")
    assert f"from the {MIN_SAMPLES_FOR_RATE}th sample on" in help_text
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        assert f"from the {MIN_SAMPLES_FOR_RATE}th sample on" in f.read()
