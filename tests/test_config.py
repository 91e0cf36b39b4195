"""The config system: presets, overrides from YAML and the command line, validation messages."""
import pytest
import yaml

from rin_scale.config import ConfigError, check_world, dump_yaml, from_dict, load_config, to_dict
from rin_scale.presets import PRESETS, get_preset


def test_every_preset_validates_and_round_trips():
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.name == name
        again = from_dict(yaml.safe_load(dump_yaml(cfg)))
        assert to_dict(again) == to_dict(cfg)


def test_paper_settings_of_the_authors_presets():
    c = get_preset("cifar10")
    assert (c.model.num_blocks, c.model.latent_layers, c.model.num_latents, c.model.latent_dim) == (3, 2, 128, 512)
    assert (c.model.interface_dim, c.model.patch_size, c.model.dropout, c.model.drop_path) == (256, 2, 0.1, 0.1)
    assert (c.diffusion.schedule, c.diffusion.sigmoid_start, c.diffusion.sigmoid_end, c.diffusion.sigmoid_tau) == \
        ("sigmoid", -3, 3, 0.9)
    assert c.diffusion.self_cond_rate == 0.9 and c.train.optimizer == "lamb" and c.train.lr == 3e-3
    i = get_preset("imagenet64")
    assert (i.model.num_blocks, i.model.latent_layers, i.model.latent_dim, i.model.patch_size) == (4, 4, 768, 8)
    assert get_preset("imagenet64_p4").model.patch_size == 4
    k = get_preset("kinetics600").model
    assert (k.frames, k.cond_frames, k.pred_frames, k.patch_frames, k.patch_size) == (16, 5, 11, 2, 4)
    for size in (256, 512, 1024):
        assert get_preset(f"imagenet{size}").model.patch_size == 8


def test_overrides_are_typed_and_applied_in_order(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: cifar10\ntrain:\n  lr: 1.0e-4\n  betas: [0.9, 0.99]\nmodel:\n  dropout: 0.2\n")
    cfg = load_config(None, [str(f), "train.lr=5e-4", "train.total_steps=10", "data.hflip=false"])
    assert cfg.model.latent_dim == 512 and cfg.model.dropout == 0.2
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.total_steps, int) and cfg.train.betas == (0.9, 0.99)
    assert cfg.data.hflip is False
    assert load_config("tiny", ["model.image_size=32"]).model.image_size == 32


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
])
def test_bad_values_give_one_line_errors_naming_the_key(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_video_validation():
    with pytest.raises(ConfigError, match="patch_frames=3 does not divide model.frames=8"):
        load_config("tiny_video", ["model.patch_frames=3"])
    with pytest.raises(ConfigError, match="cond_frames=8 must be less than"):
        load_config("tiny_video", ["model.cond_frames=8"])
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
