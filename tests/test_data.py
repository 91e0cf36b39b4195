"""The data pipeline on real tar shards: local folders, the GCS emulator, forked DataLoader workers."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from PIL import Image

from data_tools.embedded import digits
from data_tools.index import write_shard
from data_tools.check import main as check_main
from data_tools.shard import main as shard_main
from data_tools.shard import make_shards, shuffle_items
from rin_scale.config import load_config
from rin_scale.data import DataError, ShardLoader, iter_samples
from rin_scale.media import to_unit
from rin_scale.shards import read_tar_samples, tar_bytes
from rin_scale.storage import fs_path, write_bytes

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Ran:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(module, *args, check=True):
    """A CLI's main() in this process (the console scripts call the same function)."""
    main = {"data_tools.shard": shard_main, "data_tools.check": check_main}[module]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    if check:
        assert rc == 0, err.getvalue()[-2000:]
    return Ran(rc, out.getvalue(), err.getvalue())


def image_cfg(shards, workers=2, **kw):
    over = [f"data.shards={shards}", f"data.workers={workers}", "data.shuffle_buffer=50"]
    return load_config("tiny", over + [f"data.{k}={v}" for k, v in kw.items()])


def epoch_keys(cfg, batch, rank=0, world=1, state=None, n=None):
    loader = ShardLoader(cfg.data, cfg.model, batch, rank, world, state=state)
    n = loader.batches_per_epoch if n is None else n
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    return loader, out


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """The 360 held-out digits in 4 local shards of 90 (labelled, PNG)."""
    out = str(tmp_path_factory.mktemp("heldout"))
    items = [(f"embedded:{n}", a, y) for n, a, y in digits("heldout")]
    opts = {"kind": "image", "shard_size": 90, "shard_bytes": 0, "resize": 0, "format": None,
            "clip_frames": 0, "frame_stride": 1, "source": "test"}
    make_shards(items, out, opts, [str(i) for i in range(10)], workers=1, progress=False)
    return out


def all_keys(url):
    keys = []
    for i in range(4):
        for _, s in read_tar_samples(f"{url}/data-{i:06d}.tar"):
            keys.append(s["__key__"])
    return keys


# --------------------------------------------------------------------------------------------
# The shard tool


def _image_folder(root, n=24):
    """Class subfolders of PNG and JPEG digits, one unreadable file."""
    for i, (_, arr, y) in enumerate(list(digits("train", size=20))[:n]):
        d = root / f"class_{y}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(d / f"img{i:03d}.{'png' if i % 2 else 'jpg'}")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")


def test_shard_folder_labels_resize_skip_and_determinism(tmp_path):
    src = tmp_path / "src"
    _image_folder(src)
    p = run_cli("data_tools.shard", str(src), str(tmp_path / "a"), "--shard-size", "10", "--resize", "16",
                "--workers", "2", "--quiet")
    assert "skipped 1 input file(s)" in p.stdout
    run_cli("data_tools.shard", str(src), str(tmp_path / "b"), "--shard-size", "10", "--resize", "16",
            "--workers", "1", "--quiet")
    man = json.loads((tmp_path / "a" / "data-manifest.json").read_text())
    assert man["total"] == 24 and [s["samples"] for s in man["shards"]] == [10, 10, 4]
    assert man["skipped"] == 1 and man["errors"][0]["source"].endswith("broken.jpg")
    assert man["classes"] == sorted({f"class_{y}" for _, _, y in list(digits("train"))[:24]})
    for s in man["shards"]:  # same input, same bytes, whatever the worker count
        assert (tmp_path / "a" / s["name"]).read_bytes() == (tmp_path / "b" / s["name"]).read_bytes()
    samples = [s for _, s in read_tar_samples(str(tmp_path / "a" / "data-000000.tar"))]
    img = Image.open(io.BytesIO(samples[0].get("jpg") or samples[0]["png"]))
    assert img.size == (16, 16)
    src_name = json.loads(samples[0]["json"])["source"]
    assert man["classes"][int(samples[0]["cls"])] in src_name


def test_shard_16bit_png_and_exif_orientation(tmp_path):
    import numpy as np

    src = tmp_path / "src"
    src.mkdir()
    grad = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(grad).save(src / "grad16.png")  # mode I;16
    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high as stored
    stored[:5, :5] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: 20 wide, 40 high
    Image.fromarray(stored).save(src / "rotated.jpg", exif=exif, quality=95)
    p = run_cli("data_tools.shard", str(src), str(tmp_path / "out"), "--workers", "1", "--quiet")
    assert p.stdout.startswith("wrote 2 image samples from 2 inputs") and p.stdout.count("\n") == 1
    samples = {json.loads(s["json"])["source"].rsplit("/", 1)[-1]: s
               for _, s in read_tar_samples(str(tmp_path / "out" / "data-000000.tar"))}
    g = Image.open(io.BytesIO(samples["grad16.png"]["png"]))
    assert g.mode == "L" and np.abs(np.asarray(g, float) - grad / 257).max() <= 0.5  # 8-bit gradient, not white
    r = Image.open(io.BytesIO(samples["rotated.jpg"]["jpg"]))
    assert r.size == (20, 40) and r.getexif().get(0x0112, 1) == 1
    assert np.asarray(r)[:5, -5:, 0].mean() > 200 and np.asarray(r)[:5, :5, 0].mean() < 50  # marker top right
    assert {k: json.loads(samples["rotated.jpg"]["json"])[k] for k in ("width", "height")} == {"width": 20, "height": 40}


def test_shard_stray_top_level_files_keep_the_class_folders(tmp_path):
    src = tmp_path / "src"
    for i, (_, arr, _) in enumerate(list(digits("train"))[:8]):
        d = src / ("cat", "dog")[i % 2] if i < 6 else src
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(d / ("README.jpg", "notes.png")[i - 6] if i >= 6 else d / f"{i}.png")
    p = run_cli("data_tools.shard", str(src), str(tmp_path / "out"), "--workers", "1", "--quiet")
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("warning: skipped 2 of 8 image files")
    assert "(README.jpg, notes.png)" in p.stderr and "outside the class subfolders" in p.stderr
    assert "wrote 6 image samples from 8 inputs" in p.stdout and "skipped 2 input file(s)" in p.stdout
    man = json.loads((tmp_path / "out" / "data-manifest.json").read_text())
    assert man["classes"] == ["cat", "dog"] and man["total"] == 6 and man["skipped"] == 2
    assert sorted(e["source"].rsplit("/", 1)[-1] for e in man["errors"]) == ["README.jpg", "notes.png"]
    assert all("cls" in s for _, s in read_tar_samples(str(tmp_path / "out" / "data-000000.tar")))
    # mostly flat: unlabelled, and said so
    for i in range(4):
        shutil.move(src / ("cat", "dog")[i % 2] / f"{i}.png", src / f"{i}.png")
    p = run_cli("data_tools.shard", str(src), str(tmp_path / "flat"), "--workers", "1", "--quiet")
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("warning: only 2 of 8 image files")
    assert p.stderr.endswith("are in class subfolders: writing all 8 unlabelled\n") and "wrote 8" in p.stdout
    assert json.loads((tmp_path / "flat" / "data-manifest.json").read_text())["classes"] == []


def test_shard_where_every_input_fails_is_an_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    p = run_cli("data_tools.shard", str(src), str(tmp_path / "out"), "--workers", "1", "--quiet", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert p.stderr.startswith("error: none of the 3 inputs could be read (first error: ")
    assert any(f"/{i}.jpg: " in p.stderr for i in range(3))  # the first in the shuffled order
    assert not (tmp_path / "out" / "data-manifest.json").exists()


def test_shard_resumes_after_crash_without_redoing_complete_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for i, (_, arr, _) in enumerate(list(digits("train"))[:30]):
        Image.fromarray(arr).save(src / f"{i:03d}.png")
        files.append(f"{i:03d}.png")
    n = int(shuffle_items(files, True)[25][:3])  # written 26th, after 5 complete shards of 5
    fifo = src / f"{n:03d}.png"
    fifo.unlink()
    os.mkfifo(fifo)  # reading it blocks: the job hangs there and is killed, as by a preemption
    (src / "list.txt").write_text("\n".join(files) + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([PY, "-m", "data_tools.shard", str(src / "list.txt"), str(out), "--shard-size", "5",
                             "--workers", "1", "--quiet"], cwd=ROOT)
    prog = out / "data-progress.json"
    deadline = time.time() + 60
    while not (prog.exists() and len(json.loads(prog.read_text() or "{}").get("shards", [])) == 5):
        assert time.time() < deadline and proc.poll() is None, "shard tool did not get to the fifo"
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert not (out / "data-manifest.json").exists()
    before = {f: (out / f"data-{f:06d}.tar").stat().st_mtime_ns for f in range(5)}
    fifo.unlink()
    Image.fromarray(list(digits("train"))[n][1]).save(fifo)
    p = run_cli("data_tools.shard", str(src / "list.txt"), str(out), "--shard-size", "5", "--workers", "1", "--quiet")
    assert "wrote 30 image samples" in p.stdout
    run_cli("data_tools.shard", str(src / "list.txt"), str(tmp_path / "clean"), "--shard-size", "5", "--quiet")
    assert {f: (out / f"data-{f:06d}.tar").stat().st_mtime_ns for f in range(5)} == before
    man = json.loads((out / "data-manifest.json").read_text())
    assert man["total"] == 30 and len(man["shards"]) == 6 and not (out / "data-progress.json").exists()
    assert not list(out.glob("*.tmp-*"))
    for s in man["shards"]:
        assert (out / s["name"]).read_bytes() == (tmp_path / "clean" / s["name"]).read_bytes()
    assert man["classes"] == [] and {y for _, y, _ in iter_samples(str(out), load_config("tiny").model)} == {-1}


def test_check_reports_counts_and_damage(tmp_path, heldout):
    p = run_cli("data_tools.check", heldout, "--json", "--preview", str(tmp_path / "grid.png"))
    rep = json.loads(p.stdout)
    assert rep["shards"] == 4 and rep["samples"] == 360 and rep["errors"] == []
    assert sum(rep["classes"].values()) == 360 and Image.open(tmp_path / "grid.png").size[0] > 64
    bad = tmp_path / "bad"
    shutil.copytree(heldout, bad)
    tar = bad / "data-000002.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    p = run_cli("data_tools.check", str(bad), "--json", check=False)
    rep = json.loads(p.stdout)
    assert p.returncode == 1 and rep["samples"] < 360
    assert any("data-000002.tar" in e for e in rep["errors"])


def test_check_calls_an_empty_dataset_an_error(tmp_path):
    # the manifest that a job whose every input failed used to leave
    (tmp_path / "data-manifest.json").write_text(json.dumps({
        "shards": [], "total": 0, "classes": [], "kind": "image", "skipped": 2, "inputs": 2,
        "errors": [{"source": "a.jpg", "error": "UnidentifiedImageError: cannot identify"}] * 2}))
    p = run_cli("data_tools.check", str(tmp_path), check=False)
    errors = [ln for ln in p.stdout.splitlines() if "ERROR" in ln]
    assert p.returncode == 1 and len(errors) == 1 and "empty dataset" in errors[0]
    assert "all 2 inputs were skipped when sharding (first: a.jpg: UnidentifiedImageError" in errors[0]


def test_check_names_a_damaged_tar_in_a_folder_without_manifest(tmp_path, heldout):
    bad = tmp_path / "bad"
    shutil.copytree(heldout, bad, ignore=shutil.ignore_patterns("*.json"))
    tar = bad / "data-000001.tar"
    whole = tar.read_bytes()
    with tarfile.open(tar) as tf:
        member = tf.getmembers()[99]  # the first of sample 33 (cls, json, png)
    tar.write_bytes(whole[: member.offset_data + 10])  # inside a member's data
    p = run_cli("data_tools.check", str(bad), check=False)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1
    assert p.stderr.startswith("error: ") and "data-000001.tar is not a readable tar" in p.stderr
    tar.write_bytes(whole[: member.offset + 100])  # inside a header: tarfile reads a shorter, valid tar
    p = run_cli("data_tools.check", str(bad), check=False)
    errors = [ln for ln in p.stdout.splitlines() if "ERROR" in ln]
    assert p.returncode == 1 and len(errors) == 1 and "data-000001.tar: truncated after" in errors[0]


def test_shard_video_folder_into_clips_by_bytes(tmp_path):
    from data_tools.embedded import moving_digits
    from rin_scale.media import encode_mp4

    src = tmp_path / "videos"
    src.mkdir()
    for i, (_, clip, _) in enumerate(list(moving_digits("heldout", frames=24))[:3]):
        (src / f"v{i}.mp4").write_bytes(encode_mp4(clip))
    (src / "bad.mp4").write_bytes(b"not a video")
    run_cli("data_tools.shard", str(src), str(tmp_path / "out"), "--clip-frames", "5", "--frame-stride", "2",
            "--resize", "12", "--shard-bytes", "3000", "--shard-size", "100", "--quiet")
    man = json.loads((tmp_path / "out" / "data-manifest.json").read_text())
    assert man["kind"] == "video" and man["total"] == 3 * 2 and man["skipped"] == 1  # 24 frames / 2 = 2 clips of 5
    assert len(man["shards"]) > 1 and all(s["bytes"] < 3000 + 4 * 10240 for s in man["shards"])
    rep = json.loads(run_cli("data_tools.check", str(tmp_path / "out"), "--json").stdout)
    assert rep["frames"] == {"5": 6} and rep["sizes"] == {"12x12": 6} and rep["errors"] == []
    meta = [json.loads(s["json"]) for _, s in read_tar_samples(str(tmp_path / "out" / "data-000000.tar"))]
    assert [m["start_frame"] for m in meta[:2]] == [0, 10] and meta[0]["frame_stride"] == 2


# --------------------------------------------------------------------------------------------
# The streaming pipeline


def test_two_ranks_two_workers_cover_the_epoch_once(heldout):
    cfg = image_cfg(heldout, workers=2)
    keys = []
    for rank in range(2):  # 360 samples = 2 ranks x 15 batches x 12: nothing left over
        loader, batches = epoch_keys(cfg, 12, rank, 2)
        assert loader.batches_per_epoch == 15 and len(batches) == 15
        for b in batches:
            assert b["x"].shape == (12, 3, 16, 16) and b["x"].dtype == torch.uint8  # made float on the device
            assert b["label"].dtype == torch.long
            assert (b["label"] >= 0).all() and (b["label"] < 10).all()
            keys += b["key"]
    assert len(keys) == 360 and sorted(keys) == sorted(all_keys(heldout))
    # with a remainder: 360 // 2 = 180 per rank, 11 batches of 16; 2 x 4 samples are left out this epoch
    per_rank = [sum((b["key"] for b in epoch_keys(cfg, 16, r, 2)[1]), []) for r in range(2)]
    assert [len(k) for k in per_rank] == [176, 176] and not set(per_rank[0]) & set(per_rank[1])


def test_epochs_reshuffle_and_labels_match(heldout):
    cfg = image_cfg(heldout, workers=0)
    loader = ShardLoader(cfg.data, cfg.model, 30)
    it = iter(loader)
    e0 = [next(it) for _ in range(12)]
    e1 = [next(it) for _ in range(12)]
    k0, k1 = sum((b["key"] for b in e0), []), sum((b["key"] for b in e1), [])
    assert sorted(k0) == sorted(k1) and k0 != k1 and loader.state_dict()["epoch"] == 1
    truth = {k: (x, y) for x, y, k in iter_samples(heldout, cfg.model)}
    b = e0[0]
    for i, k in enumerate(b["key"]):
        x, y = truth[k]
        assert int(b["label"][i]) == y and torch.equal(to_unit(b["x"][i]), x)  # hflip off in tiny


def test_shards_read_the_same_through_webdataset_itself(heldout):
    # The shard contract is WebDataset's: the library itself must read our shards, keys and labels alike.
    import webdataset as wds

    urls = [f"{heldout}/data-{i:06d}.tar" for i in range(4)]
    theirs = {s["__key__"]: int(s["cls"]) for s in wds.WebDataset(urls, shardshuffle=False)}
    ours = {k: y for _, y, k in iter_samples(heldout, image_cfg(heldout).model)}
    assert len(theirs) == 360 and theirs == ours


def test_random_crop_also_crops_data_sharded_at_the_training_size():
    from rin_scale.media import decode_image

    arr = (torch.arange(64 * 64 * 3) % 251).to(torch.uint8).reshape(64, 64, 3).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    centre = decode_image(buf.getvalue(), 64, 3)
    assert torch.equal(centre, torch.from_numpy(arr).permute(2, 0, 1))  # no augmentation: untouched
    import numpy as np

    rng = np.random.default_rng(0)
    crops = [decode_image(buf.getvalue(), 64, 3, rng, random_crop=True) for _ in range(8)]
    assert all(c.shape == (3, 64, 64) for c in crops)
    # scaled by 1 to 1.25 and cropped at random (a scale draw near 1 can leave it as it was)
    assert sum(not torch.equal(c, centre) for c in crops) >= 5


@pytest.mark.parametrize("stop", [7, 15])
def test_resume_yields_the_same_stream(heldout, stop):
    cfg = image_cfg(heldout, workers=2, hflip=True, random_crop=True)
    full_loader = ShardLoader(cfg.data, cfg.model, 12, 1, 2)
    it = iter(full_loader)
    full = [next(it) for _ in range(22)]  # crosses into epoch 1
    first = ShardLoader(cfg.data, cfg.model, 12, 1, 2)
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["position"] == stop  # what the consumer received, not what workers prefetched
    del it
    resumed = ShardLoader(cfg.data, cfg.model, 12, 1, 2, state=state)
    it = iter(resumed)
    rest = [next(it) for _ in range(22 - stop)]
    assert [b["key"] for b in rest] == [b["key"] for b in full[stop:]]
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(rest, full[stop:]))


def test_resume_with_another_sequence_restarts_at_the_same_fraction(heldout):
    cfg = image_cfg(heldout, workers=0)
    old = ShardLoader(cfg.data, cfg.model, 12, 0, 2)
    it = iter(old)
    for _ in range(5):
        next(it)
    state = {**old.state_dict(), "shuffle_buffer": 7}  # another order of the epoch: only its fraction carries over
    new = ShardLoader(cfg.data, cfg.model, 12, 0, 1, state=state)  # 30 batches per epoch now
    assert new.state_dict()["position"] == 10 and new.state_dict()["epoch"] == 0
    it = iter(new)
    assert len([next(it) for _ in range(21)]) == 21 and new.state_dict()["epoch"] == 1


def run_ranks(cfg, world, batch, n, state=None):
    """Keys of n batches on every rank (each resumed from `state`, rank 0's as the trainer does); rank 0's state."""
    keys, last = [], None
    for rank in range(world):
        loader = ShardLoader(cfg.data, cfg.model, batch, rank, world, state=state, global_batch=24)
        it = iter(loader)
        todo = loader.batches_per_epoch - loader.position if n is None else n
        keys += sum((next(it)["key"] for _ in range(todo)), [])
        last = last or json.loads(json.dumps(loader.state_dict()))
    return keys, last


@pytest.mark.parametrize("before,after", [((2, 12), (1, 24)), ((1, 24), (2, 12)), ((2, 12), (3, 8))])
def test_resume_at_another_world_size_sees_each_sample_of_the_epoch_once(heldout, before, after):
    # the trainer's case: global batch 24 kept, micro-batch = 24 / ranks; 360 samples = 15 global batches
    cfg = image_cfg(heldout, workers=2)
    first, state = run_ranks(cfg, *before, n=6 * 24 // (before[0] * before[1]))
    assert state["consumed"] == 144 and state["epoch"] == 0
    rest, state = run_ranks(cfg, *after, n=None, state=state)
    assert len(first) == 144 and len(rest) == 216
    assert sorted(first + rest) == sorted(all_keys(heldout))  # each key of the epoch exactly once


def test_one_sequence_whatever_the_world_size_and_worker_count(heldout):
    # global micro-batch j is positions [24 j, 24 (j + 1)) of the epoch, split by rank
    one, _ = run_ranks(image_cfg(heldout, workers=0), 1, 24, n=15)
    two, _ = run_ranks(image_cfg(heldout, workers=2), 2, 12, n=15)
    three, _ = run_ranks(image_cfg(heldout, workers=3), 3, 8, n=15)
    by_batch = lambda keys, world, b: [sorted(sum((keys[r * 15 * b + j * b:r * 15 * b + (j + 1) * b]  # noqa: E731
                                                   for r in range(world)), [])) for j in range(15)]
    assert by_batch(one, 1, 24) == by_batch(two, 2, 12) == by_batch(three, 3, 8)


def test_resume_that_cannot_continue_the_sequence_is_one_line(heldout):
    cfg = image_cfg(heldout, workers=0)
    _, state = run_ranks(cfg, 2, 12, n=5)  # 120 samples: not a whole number of batches of 16 x 2
    with pytest.raises(DataError, match="not a whole number of batches of 16 x 2 rank") as e:
        ShardLoader(cfg.data, cfg.model, 16, 0, 2, state=state)
    assert "\n" not in str(e.value)


def test_corrupt_samples_and_truncated_shard_are_skipped_and_counted(tmp_path, heldout):
    bad = tmp_path / "bad"
    shutil.copytree(heldout, bad)
    s0 = [s for _, s in read_tar_samples(str(bad / "data-000000.tar"))]
    broken = s0[3]["__key__"]
    s0[3]["png"] = b"\x89PNG garbage"
    fs, _ = fs_path(str(bad))
    write_shard(str(bad / "data-000000.tar"), tar_bytes(s0))  # a rewritten shard gets its index rewritten too
    t1 = bad / "data-000001.tar"
    t1.write_bytes(t1.read_bytes()[: int(t1.stat().st_size * 0.6)])
    readable = {s["__key__"] for _, s in read_tar_samples_safely(str(t1))}
    lost = {broken} | (set(all_keys(heldout)[90:180]) - readable)
    cfg = image_cfg(str(bad), workers=2, max_error_rate=0.5)
    keys, errors = [], 0
    for rank in range(2):
        loader, batches = epoch_keys(cfg, 12, rank, 2)
        assert len(batches) == 15  # every rank still gets its full epoch
        keys += sum((b["key"] for b in batches), [])
        errors += loader.stats["errors"]
    assert errors == len(lost) and len(keys) == 360
    assert set(keys) == set(all_keys(heldout)) - lost  # the rest of the data arrives
    cfg = image_cfg(str(bad), workers=0, max_error_rate=0.01)
    with pytest.raises(DataError, match="max_error_rate"):
        epoch_keys(cfg, 12, 0, 1)


def read_tar_samples_safely(url):
    try:
        yield from read_tar_samples(url)
    except (tarfile.TarError, OSError):
        return


def test_bad_data_urls_give_one_line_errors(tmp_path):
    p = run_cli("data_tools.shard", str(tmp_path / "missing"), str(tmp_path / "out"), check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1
    for url, msg in [("", "data.shards is empty"), (str(tmp_path / "nope"), "does not exist"),
                     (str(tmp_path), "no .tar shards")]:
        cfg = image_cfg(url)
        with pytest.raises(DataError, match=msg) as e:
            ShardLoader(cfg.data, cfg.model, 4)
        assert "\n" not in str(e.value)


def test_video_clips_from_moving_digits(tmp_path):
    out = str(tmp_path / "vid")
    run_cli("data_tools.shard", "--embedded", "moving_digits", "--split", "heldout", out, "--shard-size", "60",
            "--workers", "2", "--quiet")
    cfg = load_config("tiny_video", [f"data.shards={out}", "data.workers=2", "data.shuffle_buffer=20"])
    loader, batches = epoch_keys(cfg, 6, 0, 2, n=3)
    x = to_unit(batches[0]["x"])
    assert x.shape == (6, 3, cfg.model.frames, 16, 16) and -1 <= x.min() and x.max() <= 1
    assert (x[:, :, 1:] - x[:, :, :-1]).abs().mean() > 0.01  # the digit moves
    state = loader.state_dict()
    _, again = epoch_keys(cfg, 6, 0, 2, state={**state, "position": 1, "consumed": 1 * 6 * 2}, n=2)
    assert [b["key"] for b in again] == [b["key"] for b in batches[1:]]
    assert torch.equal(again[0]["x"], batches[1]["x"])  # same random clip start on resume
    p = run_cli("data_tools.check", out, "--json", "--preview", str(tmp_path / "strip.gif"))
    assert json.loads(p.stdout)["frames"] == {"16": 360}
    assert Image.open(tmp_path / "strip.gif").n_frames == 16


# --------------------------------------------------------------------------------------------
# gs:// on a real GCS API server (fake-gcs-server on 127.0.0.1, the stand-in for a bucket)


def test_shard_to_gcs_and_stream_from_it_with_workers(gcs_bucket, heldout):
    url = f"{gcs_bucket}/digits"
    p = run_cli("data_tools.shard", "--embedded", "digits", "--split", "heldout", url, "--shard-size", "90",
                "--workers", "2", "--quiet")
    assert "360 image samples" in p.stdout and "4 shards" in p.stdout
    fs, path = fs_path(url)
    names = sorted(n.rsplit("/", 1)[-1] for n in fs.ls(path))
    assert names == sorted([f"data-{i:06d}.tar{x}" for i in range(4) for x in ("", ".idx")]
                           + ["data-inputs.txt.gz", "data-manifest.json"])
    rep = json.loads(run_cli("data_tools.check", url, "--json").stdout)
    assert rep["samples"] == 360 and rep["errors"] == []
    cfg = image_cfg(url, workers=2)
    keys = []
    for rank in range(2):
        loader, batches = epoch_keys(cfg, 12, rank, 2)
        keys += sum((b["key"] for b in batches), [])
    assert sorted(keys) == sorted(all_keys(heldout))  # the same digits as the local shards
    gcs = [(k, y) for _, y, k in iter_samples(url, cfg.model)]
    local = [(k, y) for _, y, k in iter_samples(heldout, cfg.model)]
    assert gcs == local
