"""The config system: presets, overrides from YAML and the command line, validation messages."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from rin_scale.config import (ConfigError, Config, check_world, dump_yaml, from_dict, load_config, load_yaml_into,
                              model_config_from_dict, reference_markdown, reference_page, to_dict)
from rin_scale.presets import PRESETS


def test_every_preset_validates_and_round_trips():
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.name == name
        again = from_dict(yaml.safe_load(dump_yaml(cfg)))
        assert to_dict(again) == to_dict(cfg)


def test_overrides_are_typed_and_applied_in_order(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: cifar10\ntrain:\n  lr: 1.0e-4\n  betas: [0.9, 0.99]\nmodel:\n  dropout: 0.2\n")
    cfg = load_config(None, [str(f), "train.lr=5e-4", "train.total_steps=10", "data.hflip=false"])
    assert cfg.model.latent_dim == 512 and cfg.model.dropout == 0.2
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.total_steps, int) and cfg.train.betas == (0.9, 0.99)
    assert cfg.data.hflip is False
    assert load_config("tiny", ["model.image_size=32"]).model.image_size == 32
    # the later item wins, whether a key=value or a YAML file (key=value runs merge in one go)
    assert load_config("tiny", ["train.lr=1e-3", "train.lr=2e-3"]).train.lr == 2e-3
    assert load_config("tiny", ["train.lr=2e-3", str(f)]).train.lr == 1e-4
    assert load_config("tiny", ["train.lr=2e-3", str(f), "train.lr=3e-3"]).train.lr == 3e-3


@pytest.mark.parametrize("overrides, words", [
    (["model.latent_dims=3"], ["unknown config key", "latent_dim"]),
    (["train.lr=fast"], ["train.lr", "float"]),
    (["model.patch_size=3"], ["patch_size=3", "does not divide", "image_size=16"]),
    (["model.latent_heads=5"], ["latent_heads=5", "not divisible"]),
    (["model.read_write_heads=7"], ["read_write_heads=7", "cross-attention width"]),
    (["model.num_latents=2"], ["num_latents=2", "time and class"]),
    (["diffusion.schedule=quadratic"], ["diffusion.schedule", "sigmoid, cosine, linear"]),
    (["diffusion.target=score"], ["diffusion.target", "eps, x0, v"]),
    (["diffusion.input_scale=0"], ["input_scale"]),
    (["diffusion.self_cond_rate=1.5"], ["self_cond_rate"]),
    (["data.kind=video"], ["data.kind", "model.frames=0", "use data.kind=image"]),
    (["model.num_classes=0", "diffusion.guidance=1"], ["guidance", "num_classes"]),
    (["train.lr"], ["no '='", "section.key=value"]),
    (["train.lrr=1"], ["unknown config key 'train.lrr'", "(valid: run_dir,", " lr,"]),
    (["nope.x=1"], ["unknown config key 'nope.x'", "the top level has no 'nope'", "train"]),
    (["train.lr.x=1"], ["'train.lr' is not a section"]),
    (["train=5"], ["train: is a section"]),
    (["train.total_steps=1.5"], ["train.total_steps: expected int, got 1.5"]),
    (["data.hflip=maybe"], ["data.hflip: expected bool"]),
    (["train.betas=[0.9]"], ["train.betas: expected tuple[float, float]"]),
    (["train.run_dir=${nope}"], ["train.run_dir", "nope"]),
    (["model.conv_kernel_size=2"], ["model.conv_kernel_size=2", "odd size"]),
    (["model.conv_kernel_size=3", "model.interface_dim=130"], ["32 groups", "interface_dim=130"]),
])
def test_bad_values_give_one_line_errors_naming_the_key(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_video_validation():
    with pytest.raises(ConfigError, match="patch_frames=2 does not divide the 1 frames the tokenizer sees"):
        load_config("tiny_video", ["model.patch_frames=2"])  # cond_mode=channels: the predicted frame only
    with pytest.raises(ConfigError, match="patch_frames=3 does not divide the 8 frames .* the whole clip"):
        load_config("tiny_video", ["model.cond_mode=time", "model.frames=8", "model.patch_frames=3"])
    with pytest.raises(ConfigError, match="cond_frames=3 must be less than model.frames=3"):
        load_config("tiny_video", ["model.cond_frames=3"])
    with pytest.raises(ConfigError, match="eval.frames=2 is shorter than the model's window"):
        load_config("tiny_video", ["eval.frames=2"])
    with pytest.raises(ConfigError, match="model.cond_mode='pixels'"):
        load_config("tiny_video", ["model.cond_mode=pixels"])
    with pytest.raises(ConfigError, match="video only"):
        load_config("tiny", ["model.cond_frames=2"])


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="unknown preset 'cifar100'.*cifar10"):
        load_config("cifar100")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", ["/nonexistent/run.yaml"])


def test_check_world_splits_the_batch():
    cfg = load_config("tiny", ["train.global_batch=64"])
    assert check_world(cfg, 4) == (16, 1)
    cfg.train.micro_batch = 4
    assert check_world(cfg, 4) == (4, 4)
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        check_world(cfg, 3)


def test_int_fields_take_integral_floats_and_bools_take_words():
    cfg = load_config("tiny", ["train.total_steps=1e3", "train.warmup_steps=20.0", "data.hflip=yes",
                               "data.random_crop=1", "train.betas=[0.8, 0.9]"])
    assert cfg.train.total_steps == 1000 and isinstance(cfg.train.warmup_steps, int)
    assert cfg.data.hflip is True and cfg.data.random_crop is True and cfg.train.betas == (0.8, 0.9)
    assert load_config("tiny", ["data.hflip=no"]).data.hflip is False


def test_yaml_syntax_error_and_missing_file_are_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: 1.0e-4\n   warmup_steps: : 10\n")
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [str(f)])
    assert "\n" not in str(e.value) and str(f) in str(e.value) and "line 3" in str(e.value)
    f.write_text("train:\n  lr: 1.0\ntrain:\n  lr: 2.0\n")
    with pytest.raises(ConfigError, match="line 3.*duplicate key train"):
        load_config("tiny", [str(f)])
    with pytest.raises(ConfigError, match=r"^config file '\S+missing.yaml' does not exist$"):
        load_yaml_into(Config(), str(tmp_path / "missing.yaml"))


def test_dump_load_round_trip(tmp_path):
    cfg = load_config("kinetics600", ["train.lr=1e-4", "train.betas=[0.8, 0.95]", "data.shards=gs://b/k/{0..9}.tar",
                                      "eval.metric=fvd", "diffusion.sampler=ddim"])
    f = tmp_path / "config.yaml"
    f.write_text(dump_yaml(cfg))
    again = Config()
    load_yaml_into(again, str(f))
    assert again == cfg and isinstance(again.train.betas, tuple)
    assert model_config_from_dict(to_dict(cfg)["model"]) == cfg.model
    with pytest.raises(ConfigError, match="unknown config key 'model.width'"):
        model_config_from_dict({"width": 3})


def test_every_field_has_help_in_the_reference():
    rows = reference_markdown().splitlines()[2:]
    sections = [f for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)]
    assert len(rows) == sum(len(dataclasses.fields(f.default_factory)) for f in sections) > 50
    for row in rows:
        key, default, meaning = (c.strip() for c in row.strip("|").split(" | "))
        assert key.startswith("`") and default.startswith("`") and len(meaning) > 3, row
    assert "| `train.betas` | `(0.9, 0.999)` | optimizer betas |" in rows
    # docs/config.md is the generator's output, so a new key cannot go undocumented there
    page = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    assert page == reference_page(), "docs/config.md is stale: run `python -m rin_scale.config docs/config.md`"


def test_a_world_size_that_cannot_keep_the_global_batch_names_the_nearest_that_can():
    # 1,024 images on 56 ranks: 8 nodes of 8 GPUs after losing one node
    cfg = load_config("imagenet256", ["train.global_batch=1024"])
    with pytest.raises(ConfigError) as e:
        check_world(cfg, 56)
    assert "train.global_batch=1024 is not divisible by the world size 56: run on 32 or 64 ranks to keep it" in str(e.value)
    assert check_world(cfg, 64) == (16, 1)
    cfg = load_config("imagenet256", ["train.global_batch=1024", "train.micro_batch=8"])
    assert check_world(cfg, 32) == (8, 4)  # 32 images per rank: 4 accumulated micro-batches of 8
