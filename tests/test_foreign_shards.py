"""Shards as users bring them (#41 §5): img2dataset/video2dataset tars (`00000.tar` with `KEY.jpg` +
`KEY.cls` / `KEY.json` / `KEY.txt`, no manifest) written with the `webdataset` library's own
TarWriter; a model of the other kind than its shards; a model larger than the shards' resize.
Each stops (or warns) in one line at start-up, asserted word for word."""
import json
import os

import pytest
import webdataset as wds

from data_tools.embedded import digits
from data_tools.shard import make_shards
from rin_scale.config import ConfigError, load_config
from rin_scale.data import DataError, ShardLoader
from rin_scale.shards import tar_bytes

N_SHARDS, PER_SHARD = 2, 12


def write_foreign(folder, members):
    """img2dataset's layout: 00000.tar, 00001.tar, keys 000000000.., no manifest. members(i, label)
    gives each sample's members besides jpg. Returns {key: label}."""
    os.makedirs(folder, exist_ok=True)
    items = list(digits("heldout"))[:N_SHARDS * PER_SHARD]
    truth = {}
    for s in range(N_SHARDS):
        with wds.TarWriter(os.path.join(folder, f"{s:05d}.tar")) as w:
            for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
                _, arr, y = items[i]
                key = f"{s:05d}{i:04d}"
                w.write({"__key__": key, "jpg": arr, "txt": f"a photo of the digit {y}", **members(i, y)})
                truth[key] = y
    return truth


def read_epoch(folder, *over):
    cfg = load_config("tiny", [f"data.shards={folder}", "data.workers=2", "data.shuffle_buffer=4", *over])
    loader = ShardLoader(cfg.data, cfg.model, 4)
    seen = {}
    for b in loader:
        seen.update(zip(b["key"], b["label"].tolist()))
        if loader.position == len(loader):
            return loader, seen


def test_foreign_shards_are_labelled_from_their_cls_member(tmp_path):
    truth = write_foreign(tmp_path / "cls", lambda i, y: {"cls": y})
    loader, seen = read_epoch(tmp_path / "cls")
    assert loader.stats["errors"] == 0 and seen == truth and len(set(truth.values())) >= 5


def test_foreign_shards_are_labelled_from_a_json_field_named_by_data_label_key(tmp_path):
    truth = write_foreign(tmp_path / "json", lambda i, y: {"json": {"url": f"http://x/{i}.jpg", "label": y,
                                                                     "width": 24, "height": 24}})
    loader, seen = read_epoch(tmp_path / "json", "data.label_key=label")
    assert loader.stats["errors"] == 0 and seen == truth
    # without the key, the same shards have no label: a conditional model stops at start-up
    cfg = load_config("tiny", [f"data.shards={tmp_path / 'json'}", "data.workers=2"])
    with pytest.raises(DataError) as e:
        ShardLoader(cfg.data, cfg.model, 4)
    assert str(e.value) == (f"model.num_classes=10 but sample 000000000 of {tmp_path / 'json'} has no label (no cls "
                            f"member): set data.label_key=FIELD to take labels from each sample's json, or "
                            f"model.num_classes=0 to train unconditionally")
    # a key the json does not hold
    cfg = load_config("tiny", [f"data.shards={tmp_path / 'json'}", "data.label_key=class"])
    with pytest.raises(DataError) as e:
        ShardLoader(cfg.data, cfg.model, 4)
    assert str(e.value) == (f"model.num_classes=10 but sample 000000000 of {tmp_path / 'json'} has no label (no json "
                            f"field 'class'): set data.label_key to the json field that holds the class index, or "
                            f"model.num_classes=0 to train unconditionally")
    # a field that is not a class index (a caption)
    cfg = load_config("tiny", [f"data.shards={tmp_path / 'json'}", "data.label_key=url"])
    with pytest.raises(DataError) as e:
        ShardLoader(cfg.data, cfg.model, 4)
    assert str(e.value) == ("data.label_key=url: sample 000000000: json field 'url' is 'http://x/0.jpg', not a class "
                            "index: name a json field that holds the class index")
    with pytest.raises(ConfigError, match=r"^data.label_key='meta.label': give the name of a top-level field"):
        load_config("tiny", ["data.label_key=meta.label"])


def test_unlabelled_foreign_shards_stop_a_conditional_model_in_one_line(tmp_path):
    truth = write_foreign(tmp_path / "plain", lambda i, y: {})
    cfg = load_config("tiny", [f"data.shards={tmp_path / 'plain'}", "data.workers=2"])
    assert cfg.model.num_classes == 10
    with pytest.raises(DataError) as e:  # was: trained on label -1 throughout
        ShardLoader(cfg.data, cfg.model, 4)
    assert str(e.value) == (f"model.num_classes=10 but sample 000000000 of {tmp_path / 'plain'} has no label (no cls "
                            f"member): set data.label_key=FIELD to take labels from each sample's json, or "
                            f"model.num_classes=0 to train unconditionally")
    loader, seen = read_epoch(tmp_path / "plain", "model.num_classes=0")  # unconditional: trains
    assert loader.stats["errors"] == 0 and seen == {k: -1 for k in truth}


# --------------------------------------------------------------------------------------------
# A model of the other kind than its shards


OPTS = {"kind": "image", "shard_size": 30, "shard_bytes": 0, "resize": 0, "format": None,
        "clip_frames": 0, "frame_stride": 1, "source": "test"}


def video_shards(folder, manifest: bool):
    """Two samples whose media member is an mp4 (never decoded: the kind shows in the members)."""
    os.makedirs(folder)
    samples = [{"__key__": f"clip{i}", "mp4": b"\0" * 64, "cls": b"1"} for i in range(8)]
    with open(os.path.join(folder, "00000.tar"), "wb") as f:
        f.write(tar_bytes(samples))
    if manifest:
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump({"kind": "video", "classes": ["a", "b"], "total": 8,
                       "shards": [{"name": "00000.tar", "samples": 8}]}, f)
    return str(folder)


@pytest.mark.parametrize("manifest", [True, False])
def test_an_image_model_on_video_shards_names_the_mismatch(tmp_path, manifest):
    url = video_shards(tmp_path / "clips", manifest)
    cfg = load_config("tiny", [f"data.shards={url}", "data.workers=0"])
    with pytest.raises(DataError) as e:  # was: "no decodable sample" once the loader ran
        ShardLoader(cfg.data, cfg.model, 4)
    assert str(e.value) == (f"data.shards={url} holds video clips (mp4) but the model is an image model: use a "
                            f"video preset (model.frames > 0, data.kind=video) or image shards")


@pytest.mark.parametrize("manifest", [True, False])
def test_a_video_model_on_image_shards_names_the_mismatch(tmp_path, manifest):
    if manifest:
        url = str(tmp_path / "digits")
        items = [(f"embedded:{n}", a, y) for n, a, y in list(digits("heldout"))[:20]]
        make_shards(items, url, OPTS, [str(i) for i in range(10)], workers=1, progress=False)
        ext = "png"
    else:
        url = str(tmp_path / "foreign")
        write_foreign(url, lambda i, y: {"cls": y})
        ext = "jpg"
    cfg = load_config("tiny_video", [f"data.shards={url}", "data.workers=0"])
    with pytest.raises(DataError) as e:
        ShardLoader(cfg.data, cfg.model, 4)
    assert str(e.value) == (f"data.shards={url} holds images ({ext}) but the model is a video model "
                            f"(model.frames=3): use an image preset (model.frames=0, data.kind=image) or video shards")


# --------------------------------------------------------------------------------------------
# model.image_size above the shards' resize


def test_a_model_larger_than_the_shards_resize_warns_in_one_line(tmp_path, capfd):
    url = str(tmp_path / "small")
    items = [(f"embedded:{n}", a, y) for n, a, y in list(digits("heldout"))[:20]]
    make_shards(items, url, {**OPTS, "resize": 8}, [str(i) for i in range(10)], workers=1, progress=False)
    capfd.readouterr()
    cfg = load_config("tiny", [f"data.shards={url}", "data.workers=0"])
    assert cfg.model.image_size == 16
    ShardLoader(cfg.data, cfg.model, 4)
    said = lambda: [ln for ln in capfd.readouterr().err.splitlines() if "image_size" in ln]  # noqa: E731
    assert said() == [f"[data] warning: model.image_size=16 is larger than the shards' resize=8 ({url}): every "
                      f"sample is upsampled; re-shard with --resize 16 or set model.image_size=8"]
    for size in (8, 4):  # equal or smaller: fine, nothing said
        cfg = load_config("tiny", [f"data.shards={url}", "data.workers=0", f"model.image_size={size}"])
        ShardLoader(cfg.data, cfg.model, 4)
        assert said() == []
    # only rank 0 says it
    cfg = load_config("tiny", [f"data.shards={url}", "data.workers=0"])
    ShardLoader(cfg.data, cfg.model, 4, rank=1, world_size=2)
    assert said() == []
