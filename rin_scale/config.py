"""Typed configs, loaded from a preset, YAML files and dotted command-line overrides.

    cfg = load_config("cifar10", ["run.yaml", "train.lr=1e-4"])

Everything is validated before anything expensive starts; errors are one line naming the key
and the fix (ConfigError). `dump_yaml(cfg)` writes the resolved config into the run directory.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A bad config value; the message names the key and the fix."""


def _f(default, help: str):
    """A field with its meaning, which reference_markdown() prints in docs/config.md."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    image_size: int = _f(32, "height = width, pixels")
    channels: int = _f(3, "image channels (RGB)")
    frames: int = _f(0, "video: total frames in a clip (conditioning + predicted); 0 = images")
    cond_frames: int = _f(0, "video: leading clean frames the model is conditioned on")
    cond_mode: str = _f("time", "video: how the given frames enter: time (the authors: tokenized with the clip, "
                                "along time) | channels (stacked onto every predicted frame as input channels)")
    patch_size: int = _f(2, "spatial patch of the tokenizer: interface tokens = (size / patch)^2")
    patch_frames: int = _f(1, "video: temporal extent of a 3-D patch")
    interface_dim: int = _f(256, "width d of the interface tokens X")
    interface_mlp_ratio: float = _f(2.0, "0 = no MLP after *write*")
    latent_dim: int = _f(512, "width d' of the latents Z")
    num_latents: int = _f(128, "latent slots in all, including the time and class tokens")
    latent_mlp_ratio: float = _f(4.0, "MLP hidden width / latent_dim")
    num_blocks: int = _f(3, "read / compute / write blocks, no weight tying")
    latent_layers: int = _f(2, "compute layers per block")
    latent_heads: int = _f(16, "heads of the latent self-attention")
    read_write_heads: int = _f(8, "heads of read / write cross-attention (width min(d, d'))")
    dropout: float = _f(0.1, "in the compute layers only")
    drop_path: float = _f(0.1, "in the compute layers only")
    num_classes: int = _f(0, "0 = unconditional")
    class_dropout: float = _f(0.1, "label dropout for classifier-free guidance (0 = off)")
    rw_out_init: str = _f("zero", "output projections of read / write: zero (identity at init; for AdamW) | "
                                  "glorot (the authors'; for LAMB, see bench/recipe_init.py)")
    pos_encoding: str = _f("learned", "interface positions: learned (trunc normal 0.02) | sin_cos_plus_learned "
                                      "(the authors' option: fixed 2-D sin-cos codes + a learned residual from zero)")
    conv_kernel_size: int = _f(0, "the authors' optional depthwise conv over the interface's token grid after each "
                                  "write (their conv_kernel_size; 3-D for video over several token-frames); 0 = off, "
                                  "as their configs")

    @property
    def is_video(self) -> bool:
        return self.frames > 0

    @property
    def pred_frames(self) -> int:
        return self.frames - self.cond_frames

    @property
    def stacks_given(self) -> bool:
        """Video whose given frames join the predicted frames' channels (cond_mode=channels)."""
        return self.is_video and self.cond_frames > 0 and self.cond_mode == "channels"

    @property
    def token_frames(self) -> int:
        """Frames the tokenizer sees: the whole clip, or only the predicted ones (cond_mode=channels)."""
        return self.pred_frames if self.stacks_given else self.frames

    @property
    def sample_shape(self) -> tuple:
        """What the network denoises, per example: (C, H, W), or (C, predicted frames, H, W)."""
        s = self.image_size
        return (self.channels, self.pred_frames, s, s) if self.is_video else (self.channels, s, s)


@dataclass
class DiffusionConfig:
    schedule: str = _f("sigmoid", "training schedule: sigmoid | cosine | linear")
    sigmoid_start: float = _f(-3.0, "sigmoid schedule: start of the logistic's input range")
    sigmoid_end: float = _f(3.0, "sigmoid schedule: end of the range")
    sigmoid_tau: float = _f(0.9, "sigmoid schedule: temperature (CIFAR-10: -3, 3, 0.9)")
    target: str = _f("eps", "eps | x0 | v")
    input_scale: float = _f(1.0, "b: data in [-1, 1] times b")
    self_cond_rate: float = _f(0.9, "per-example probability of the latent warm start in training")
    sampler: str = _f("ddpm", "ddpm | ddim")
    sample_schedule: str = _f("cosine", "schedule used by the samplers (the network sees gamma, so it may differ)")
    sample_steps: int = _f(100, "sampler steps (the paper's FIDs use 1000 DDPM steps)")
    guidance: float = _f(0.0, "classifier-free guidance weight w: (1 + w) cond - w uncond")


@dataclass
class DataConfig:
    shards: str = _f("", "fsspec URL of a shard folder, a manifest, or a brace pattern")
    kind: str = _f("image", "image | video (must agree with the model)")
    workers: int = _f(2, "DataLoader workers per rank")
    shuffle_buffer: int = _f(1000, "samples held in the shuffle buffer per worker")
    interleave: int = _f(0, "shards whose samples are mixed at a time (rin_scale/data.py); 0 = 4 for shards "
                            "data_tools.shard wrote shuffled, 64 for others (they may hold one class each); "
                            "class-sorted shards need about 5x the per-rank batch")
    random_crop: bool = _f(False, "random crop instead of a center crop to image_size")
    hflip: bool = _f(True, "random horizontal flips")
    label_key: str = _f("", 'where a sample\'s class label is: "" = its cls member; a name = that field of its '
                            'json member, an int (e.g. img2dataset/video2dataset metadata)')
    max_error_rate: float = _f(0.05, "stop the run when more than this fraction of samples fail (checked from "
                                     "the 200th sample on, so one bad shard up front does not stop it)")
    storage_retry_seconds: float = _f(600.0, "seconds a storage outage (refused, timeouts, 429/5xx, a lost upload "
                                             "session) is waited out before the run stops: shard reads, and the "
                                             "trainer's uploads and writes; corrupt bytes are never retried")
    seed: int = _f(0, "random seed (data: shard order, shuffling, augmentation; train: init, noise)")


COMM_BUCKET_MB = 50.0  # train.comm_bucket_mb's default: bench/comm_buckets.py


@dataclass
class TrainConfig:
    run_dir: str = _f("runs/default", "local path or fsspec URL (gs://bucket/runs/NAME)")
    state_dir: str = _f("", 'POSIX path shared by all ranks for DeepSpeed states; "" = run_dir/states')
    global_batch: int = _f(256, "images per optimizer step over all ranks (fixed whatever the world size)")
    micro_batch: int = _f(0, "per rank; 0 = global_batch / world_size (no accumulation)")
    total_steps: int = _f(150_000, "optimizer steps of the whole run")
    zero_stage: int = _f(2, "0 | 1 | 2 | 3")
    precision: str = _f("auto", "auto | bf16 | fp32 (auto: bf16 on GPUs with bf16 and on CPUs with avx512_bf16 / amx_bf16)")
    optimizer: str = _f("lamb", "lamb | adamw")
    lr: float = _f(3e-3, "peak learning rate, after warmup")
    betas: tuple[float, float] = _f((0.9, 0.999), "optimizer betas")
    eps: float = _f(1e-8, "optimizer epsilon, added to sqrt(v_hat) (LAMB and AdamW; the authors' 1e-8)")
    weight_decay: float = _f(0.01, "decoupled weight decay (never on biases and LayerNorms; LAMB's trust ratio "
                                   "is not applied to them either)")
    no_decay_embeddings: bool = _f(True, "also exempt positional and token embeddings from decay")
    warmup_steps: int = _f(10_000, "linear warmup from 0 to lr")
    lr_floor: float = _f(0.1, "cosine decays toward lr * lr_floor (reached at the end when lr_cosine_fraction = 1)")
    lr_cosine_fraction: float = _f(1.0, "part R of the cosine run over the decay (the authors' cosine@R: "
                                        "lr * (floor + (1 - floor) * 0.5 * (1 + cos(pi * R * progress))))")
    compile_optimizer: str = _f("auto", "auto | always | never: LAMB's passes through torch.compile (auto: from 10M "
                                        "parameters, where the ~15 s compile pays back)")
    grad_clip: float = _f(0.0, "0 = off")
    max_nonfinite: int = _f(20, "consecutive skipped steps before the run stops")
    hang_timeout_s: float = _f(900.0, "a rank with no progress this long (or 10x its typical step, if longer) "
                                      "dumps every thread's stack to RUN/hangs/ and exits, so the job ends and "
                                      "requeues; covers saves and previews, and must exceed "
                                      "data.storage_retry_seconds (0 = no watchdog)")
    collective_timeout_s: float = _f(1800.0, "deadline of one collective (the process group's timeout): must "
                                             "exceed train.hang_timeout_s and data.storage_retry_seconds, so "
                                             "deliberate waits finish and the watchdog, which says where the job "
                                             "hung, fires first")
    ema_decay: float = _f(0.9999, "EMA of the weights, updated every step in fp32")
    ema_warmup: bool = _f(False, "decay min(ema_decay, (1+step)/(k+step)), k = ema_warmup_offset: for short runs "
                                 "(the paper: off)")
    ema_warmup_offset: float = _f(10.0, "k above: the EMA then averages about the last step/(k-1) steps "
                                        "(larger = shorter)")
    activation_checkpointing: int = _f(0, "0 = off, k = every k-th block (1 = every block)")
    checkpoint_cpu_offload: bool = _f(False, "keep activation checkpoints in CPU memory (GPU memory saver)")
    overlap_comm: bool = _f(True, "ZeRO 1-3 on GPUs: reduce gradient buckets while the backward pass goes "
                                      "on (the CPU has no side stream: never there)")
    comm_bucket_mb: float = _f(COMM_BUCKET_MB, "ZeRO 1-3: MB of fp32 gradients per reduce / all-gather bucket "
                                               "(chosen on 2 gloo ranks: docs/benchmarks.md)")
    reduce_bf16: bool = _f(False, "bf16 runs: reduce the gradients of Linear and Conv layers in bf16 (half the "
                                  "traffic; DeepSpeed's lower_precision_safe_modules)")
    state_every: int = _f(1000, "steps between full training states")
    snapshot_every: int = _f(1000, "steps between EMA snapshots")
    keep_last: int = _f(3, "newest states and snapshots kept")
    milestone_every: int = _f(0, "steps; every such state/snapshot is kept too (0 = none)")
    log_every: int = _f(50, "steps between log lines and TensorBoard scalars")
    sample_every: int = _f(1000, "steps between sample grids in TensorBoard (0 = never)")
    sample_count: int = _f(16, "images in the TensorBoard sample grid")
    sample_steps: int = _f(50, "DDIM steps of the sample grid, in bf16 where the device has it (0 = the "
                               "snapshot's sampler: diffusion.sampler at diffusion.sample_steps, fp32)")
    peak_tflops: float = _f(0.0, "per device, for MFU; 0 = a table (GPUs) or the best matmul probe on this machine (CPU)")
    seed: int = _f(0, "random seed (data: shard order, shuffling, augmentation; train: init, noise)")


@dataclass
class EvalConfig:
    metric: str = _f("auto", "auto (fid for images, fvd for video) | fid | fvd")
    num_samples: int = _f(1000, "samples per evaluated snapshot (50,000 for published FIDs)")
    batch: int = _f(50, "samples per sampling batch")
    sampler: str = _f("", '"" = diffusion.sampler')
    steps: int = _f(0, "0 = diffusion.sample_steps")
    order: str = _f("all", "all | newest | milestones")
    poll_seconds: float = _f(60.0, "seconds between looks for new snapshots")
    inception_weights: str = _f("", "local file with the torch-fidelity InceptionV3 weights")
    i3d_weights: str = _f("", "local TorchScript I3D file (StyleGAN-V's)")
    reference: str = _f("", 'URL of cached reference statistics; "" = computed from data.shards')
    cache_dir: str = _f("~/.cache/rin_scale", "where reference statistics are cached (any fsspec URL)")
    classifier_data: str = _f("", "held-out labelled shards: also report the class accuracy of samples")
    reference_samples: int = _f(0, "real samples in the reference statistics (0 = all of the shards)")
    frames: int = _f(0, "video: frames per scored clip, given + predicted (0 = model.frames); more than "
                        "model.frames: the model extends each clip autoregressively (diffusion.sample_clip)")
    claim_timeout: float = _f(7200.0, "upper bound (seconds) on how long another service's claim counts while its "
                                   "heartbeat is fresh; a dead holder's claim is taken over at once")
    chunk: int = _f(1000, "samples per chunk: services (and the GPUs of one eval job) claim a snapshot's samples a "
                          "chunk at a time; a kill loses at most the chunk in flight")
    keep_samples: bool = _f(False, "also keep each chunk's samples (uint8) under RUN/eval/samples: "
                                   "python -m evals.export writes them as an ADM .npz")
    keep_unscored: int = _f(8, "disk budget, in snapshots: the trainer keeps up to this many snapshots beyond "
                               "train.keep_last that the eval plan (eval.order) has not scored yet, while an eval "
                               "service works on the run; 0 = prune to train.keep_last whatever is scored")


@dataclass
class Config:
    name: str = _f("custom", "the preset this config started from")
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Loading and overriding: OmegaConf types and stores the values; this module only words the errors


def _merge(cfg, items) -> None:
    """Set (dotted key, value) pairs on the dataclass `cfg` in place, converted to the fields' types."""
    if not items:
        return
    key = value = None
    try:
        node = OmegaConf.structured(cfg)
        for key, value in items:
            # OmegaConf's int fields refuse 1e3 and "1e3", a common way to write step counts
            if type(OmegaConf.select(node, key, default=None)) is int and _integral(value):
                value = int(float(value))
            OmegaConf.update(node, key, value)
        key = None
        new = OmegaConf.to_object(node)  # interpolations (${...}) resolve here
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, key or e.full_key or "", value if key else e.value)) from None
    _copy_into(cfg, new)


def _copy_into(dst, src) -> None:
    """Field by field, so that sections a caller already holds (cfg.train) see the new values."""
    for f in dataclasses.fields(dst):
        v = getattr(src, f.name)
        if dataclasses.is_dataclass(v):
            _copy_into(getattr(dst, f.name), v)
        else:
            setattr(dst, f.name, v)


def _integral(v) -> bool:
    try:
        return isinstance(v, (float, str)) and float(v).is_integer()
    except ValueError:
        return False


def _explain(e: Exception, key: str, value) -> str:
    """One line for an OmegaConf error: its own messages span lines and name no valid keys."""
    typ, parts = Config, key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the top level"
        if not dataclasses.is_dataclass(typ):
            return f"unknown config key '{key}': '{where}' is not a section"
        names = [f.name for f in dataclasses.fields(typ)]
        if part not in names:
            return f"unknown config key '{key}': {where} has no '{part}' (valid: {', '.join(names)})"
        typ = typing.get_type_hints(typ)[part]
    if dataclasses.is_dataclass(typ):
        return f"{key}: is a section; set its keys, e.g. {key}.<name>=..."
    if isinstance(e, ValidationError):
        return f"{key}: expected {typ.__name__ if isinstance(typ, type) else typ}, got {value!r}"
    return f"{key}: {str(e).splitlines()[0]}"


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    """Apply `section.key=value` strings and YAML file paths, in order."""
    pending = []  # a run of key=value items goes in one merge: each merge types the whole tree (~80 ms)
    for item in overrides:
        if "=" not in item:
            if item.endswith((".yaml", ".yml")) or os.path.exists(item):
                _merge(cfg, pending)
                pending = []
                load_yaml_into(cfg, item)
                continue
            raise ConfigError(f"override '{item}' has no '=': write it as section.key=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:  # a value that is not valid YAML, or is null, stays the string as typed
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pending.append((key.strip(), raw if value is None else value))
    _merge(cfg, pending)


def load_yaml_into(cfg: Config, path: str) -> None:
    from . import storage  # credentials in the URL go to the filesystem as options (storage.fs_path)

    fs, where = storage.fs_path(path)
    path = mask_secrets(path)  # as messages show it
    try:
        with fs.open(where, "r") as f:
            d = OmegaConf.load(f)  # PyYAML plus 1e3 as a float and duplicate keys refused
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file '{path}'{where}: not valid YAML: {what}") from None
    if not isinstance(d, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, train:, ...)")
    d = OmegaConf.to_container(d)
    name = d.pop("preset", None)
    if name:  # a YAML may start from a preset and override it
        from .presets import get_preset

        _copy_into(cfg, get_preset(name))
    _merge(cfg, _leaves(d))


def load_config(preset: Optional[str] = None, overrides: list[str] = ()) -> Config:
    """Preset (default: tiny) -> YAML files and key=value overrides in order -> validated Config."""
    from .presets import get_preset

    overrides = list(overrides)
    if preset is None and overrides and "=" not in overrides[0] and not overrides[0].endswith((".yaml", ".yml")):
        preset, overrides = overrides[0], overrides[1:]
    cfg = get_preset(preset or "tiny")
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    """Plain dicts and lists (tuples become lists), for YAML and JSON."""
    def fix(x):
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        return list(x) if isinstance(x, tuple) else x

    return fix(dataclasses.asdict(cfg))


def from_dict(d: dict) -> Config:
    cfg = Config()
    _merge(cfg, _leaves(d))
    return cfg


def model_config_from_dict(d: dict) -> ModelConfig:
    return from_dict({"model": d}).model


def diffusion_config_from_dict(d: dict) -> DiffusionConfig:
    return from_dict({"diffusion": d}).diffusion


SECRET_WORDS = ("token", "secret", "password", "credential", "key_id", "access_key")


# query parameters that carry a secret (signed GCS/S3/Azure URLs, API tokens): by part, or whole name
SECRET_PARAM_WORDS = ("token", "secret", "passw", "signature", "credential", "accesskey", "access_key",
                      "apikey", "api_key", "auth")
SECRET_PARAM_NAMES = ("sig", "key", "pwd", "pass", "code")


def mask_secrets(s: str) -> str:
    """s with the secrets of any URLs in it replaced by ***: the password of `user:password@` (which
    may hold slashes, as AWS secret keys do), and the values of secret-looking query parameters (token,
    sig, X-Goog-Signature, AWSAccessKeyId, ...), also URL-encoded (%3Ftoken%3D...). A value ends at a
    quote or bracket, so `'gs://b/x?token=***' does not exist` keeps its closing quote."""
    import re

    s = re.sub(r"(s3a?://[^/?#@\s:'\"]*):[^@\s'\"]*@", r"\1:***@", s)  # AWS secret keys may hold slashes
    s = re.sub(r"(://[^/?#@\s:'\"]*):[^/@\s'\"]*@", r"\1:***@", s)

    def param(m):
        name = m.group(2).lower()
        secret = name in SECRET_PARAM_NAMES or any(w in name for w in SECRET_PARAM_WORDS)
        return f"{m.group(1)}{m.group(2)}{m.group(3)}***" if secret and m.group(4) else m.group(0)

    end = r"[^/&#;\s'\"()<>\[\]{},%]"
    s = re.sub(r"([?&;])([^=&#?;\s'\"]+)(=)(" + end + "*)", param, s) if "=" in s else s
    return re.sub(r"(?i)(%3F|%26)([^%&\s'\"]+?)(%3D)(" + end + "*)", param, s) if "%3" in s.upper() else s


def dump_yaml(cfg: Config) -> str:
    """Resolved config as YAML; values of secret-looking keys, and secrets inside URLs (see
    mask_secrets), are masked: RUN/config.yaml and --dry-run output keep no credentials."""

    def mask(x):
        if isinstance(x, dict):
            return {k: ("***" if any(w in k.lower() for w in SECRET_WORDS) and v else mask(v)) for k, v in x.items()}
        if isinstance(x, list):
            return [mask(v) for v in x]
        return mask_secrets(x) if isinstance(x, str) else x

    return yaml.safe_dump(mask(to_dict(cfg)), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Validation: everything a run would otherwise trip over minutes or hours in


def scored_clips(cfg: Config) -> Config:
    """cfg with model.frames = the length of the clips a video model is scored on: eval.frames when
    longer than the model's window (the model extends them, diffusion.sample_clip), else its window."""
    m = cfg.model
    if not m.is_video or cfg.eval.frames <= m.frames:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(m, frames=cfg.eval.frames))


def guidance_problem(m: "ModelConfig") -> str:
    """Why classifier-free guidance cannot run on a model of this config, or "" when it can: it needs a
    class-conditional model trained with label dropout (its unconditional prediction, the null class)."""
    if m.num_classes <= 0:
        return "needs a class-conditional model (model.num_classes > 0)"
    if m.class_dropout <= 0:
        return ("needs a model trained with label dropout: with model.class_dropout=0 it has no "
                "unconditional prediction to guide with")
    return ""


def conv_groups(dim: int) -> int:
    """GroupNorm groups of the interface conv: min(dim / 4, 32), as the authors' DepthwiseConvBlock."""
    return max(1, min(dim // 4, 32))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(key: str, value, options) -> None:
    _check(value in options, f"{key}={value!r} is not one of {', '.join(map(str, options))}")


def validate(cfg: Config) -> Config:
    m, d, data, t, e = cfg.model, cfg.diffusion, cfg.data, cfg.train, cfg.eval
    for key in ("image_size", "channels", "patch_size", "patch_frames", "interface_dim", "latent_dim",
                "num_blocks", "latent_layers", "latent_heads", "read_write_heads"):
        _check(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)} must be at least 1")
    _check(m.image_size % m.patch_size == 0,
           f"model.patch_size={m.patch_size} does not divide model.image_size={m.image_size}: "
           f"choose a patch size that divides it (e.g. {_divisor_near(m.image_size, m.patch_size)})")
    _check(m.latent_dim % m.latent_heads == 0,
           f"model.latent_dim={m.latent_dim} is not divisible by model.latent_heads={m.latent_heads}: "
           f"change either so that the width splits evenly into heads")
    cross = min(m.interface_dim, m.latent_dim)
    _check(cross % m.read_write_heads == 0,
           f"model.read_write_heads={m.read_write_heads} does not divide the cross-attention width "
           f"min(interface_dim, latent_dim)={cross}: change read_write_heads or the widths")
    reserved = 1 + (1 if m.num_classes > 0 else 0)
    _check(m.num_latents > reserved,
           f"model.num_latents={m.num_latents} must exceed the {reserved} slot(s) taken by the time"
           f"{' and class' if reserved == 2 else ''} token(s)")
    _check(0 <= m.dropout < 1 and 0 <= m.drop_path < 1, "model.dropout and model.drop_path must lie in [0, 1)")
    _check(m.num_classes >= 0, "model.num_classes must be 0 (unconditional) or the number of classes")
    _one_of("model.rw_out_init", m.rw_out_init, ("zero", "glorot"))
    _one_of("model.pos_encoding", m.pos_encoding, ("learned", "sin_cos_plus_learned"))
    _check(m.conv_kernel_size == 0 or (m.conv_kernel_size > 0 and m.conv_kernel_size % 2 == 1),
           f"model.conv_kernel_size={m.conv_kernel_size}: use 0 (off) or an odd size such as 3, so that the "
           f"conv keeps every token in place")
    _check(m.conv_kernel_size == 0 or m.interface_dim % conv_groups(m.interface_dim) == 0,
           f"model.conv_kernel_size > 0 group-normalizes the interface in {conv_groups(m.interface_dim)} groups, "
           f"which do not divide model.interface_dim={m.interface_dim}: use a multiple of 32 or of 4 below 128")
    if m.frames:
        _check(0 <= m.cond_frames < m.frames,
               f"model.cond_frames={m.cond_frames} must be less than model.frames={m.frames}")
        _one_of("model.cond_mode", m.cond_mode, ("time", "channels"))
        _check(m.token_frames % m.patch_frames == 0,
               f"model.patch_frames={m.patch_frames} does not divide the {m.token_frames} frames the tokenizer "
               f"sees (model.cond_mode={m.cond_mode}: " + ("the predicted frames" if m.stacks_given else
               "the whole clip, conditioning and predicted frames") + "); choose a divisor")
        _check(e.frames == 0 or e.frames >= m.frames,
               f"eval.frames={e.frames} is shorter than the model's window model.frames={m.frames}: use 0 or more")
        _check(e.frames <= m.frames or m.cond_frames > 0,
               f"eval.frames={e.frames} > model.frames extends clips from their last frames: set model.cond_frames")
    else:
        _check(m.cond_frames == 0 and m.patch_frames == 1,
               "model.cond_frames and model.patch_frames apply to video only: set model.frames > 0 or leave them 0 and 1")

    _one_of("diffusion.schedule", d.schedule, ("sigmoid", "cosine", "linear"))
    _one_of("diffusion.sample_schedule", d.sample_schedule, ("sigmoid", "cosine", "linear"))
    _one_of("diffusion.target", d.target, ("eps", "x0", "v"))
    _one_of("diffusion.sampler", d.sampler, ("ddpm", "ddim"))
    _check(d.sigmoid_end > d.sigmoid_start and d.sigmoid_tau > 0,
           "diffusion.sigmoid_end must exceed diffusion.sigmoid_start and diffusion.sigmoid_tau must be positive")
    _check(0 < d.input_scale <= 1, f"diffusion.input_scale={d.input_scale} must lie in (0, 1]")
    _check(0 <= d.self_cond_rate <= 1, f"diffusion.self_cond_rate={d.self_cond_rate} must lie in [0, 1]")
    _check(d.sample_steps >= 1, "diffusion.sample_steps must be at least 1")
    problem = d.guidance and guidance_problem(m)
    _check(not problem, f"diffusion.guidance={d.guidance}: {problem}")

    _one_of("data.kind", data.kind, ("image", "video"))
    _check((data.kind == "video") == m.is_video,
           f"data.kind={data.kind!r} does not match the model (model.frames={m.frames}): "
           f"use data.kind={'video' if m.is_video else 'image'}")
    _check(data.workers >= 0, "data.workers must be 0 or more")
    _check(data.interleave >= 0, "data.interleave must be 0 (chosen from the shards) or a number of shards")
    _check(0 <= data.max_error_rate <= 1, "data.max_error_rate must lie in [0, 1]")
    _check(data.label_key == data.label_key.strip() and "." not in data.label_key,
           f"data.label_key={data.label_key!r}: give the name of a top-level field of the samples' json "
           f"(e.g. data.label_key=label), or \"\" for their cls member")
    _check(data.storage_retry_seconds >= 0, "data.storage_retry_seconds must be 0 or more (seconds)")

    _one_of("train.zero_stage", t.zero_stage, (0, 1, 2, 3))
    _one_of("train.precision", t.precision, ("auto", "bf16", "fp32"))
    _one_of("train.optimizer", t.optimizer, ("lamb", "adamw"))
    _one_of("train.compile_optimizer", t.compile_optimizer, ("auto", "always", "never"))
    _check(t.global_batch >= 1, "train.global_batch must be at least 1")
    _check(t.micro_batch >= 0, "train.micro_batch must be 0 (derived) or positive")
    _check(t.lr > 0 and t.total_steps >= 1, "train.lr must be positive and train.total_steps at least 1")
    _check(t.eps > 0, f"train.eps={t.eps} must be positive (the authors' 1e-8)")
    _check(0 <= t.lr_floor <= 1, "train.lr_floor is a fraction of train.lr in [0, 1]")
    _check(0 < t.lr_cosine_fraction <= 1, "train.lr_cosine_fraction is the part of the cosine in (0, 1]")
    _check(0 <= t.ema_decay < 1, "train.ema_decay must lie in [0, 1)")
    _check(t.ema_warmup_offset > 1, f"train.ema_warmup_offset={t.ema_warmup_offset} must exceed 1 (at 1 or below the "
                                    "EMA never leaves the initial weights); 10 is the usual")
    _check(t.activation_checkpointing >= 0, "train.activation_checkpointing: 0 = off, k = every k-th block")
    _check(t.state_every >= 1 and t.snapshot_every >= 1 and t.log_every >= 1,
           "train.state_every, train.snapshot_every and train.log_every must be at least 1")
    _check(t.sample_steps >= 0, "train.sample_steps must be 0 (the snapshot's sampler) or a number of DDIM steps")
    _check(t.comm_bucket_mb > 0, f"train.comm_bucket_mb={t.comm_bucket_mb} must be positive (MB of gradients per "
                                 f"bucket; {COMM_BUCKET_MB:g} is the default)")
    _check_deadlines(t, data)
    _check(t.keep_last >= 1, "train.keep_last must be at least 1 (the newest state is what resume needs)")

    _validate_eval(e, m)
    return cfg


def _check_deadlines(t: TrainConfig, data: DataConfig) -> None:
    """The waits agree: a storage outage is waited out before the watchdog calls it a hang, and the
    watchdog (which dumps where the job hung) fires before a collective times out without a word."""
    wait = data.storage_retry_seconds
    _check(t.hang_timeout_s >= 0, "train.hang_timeout_s must be 0 (no watchdog) or more (seconds)")
    _check(t.hang_timeout_s == 0 or t.hang_timeout_s > wait,
           f"train.hang_timeout_s={t.hang_timeout_s:g} must exceed data.storage_retry_seconds={wait:g}: a storage "
           f"outage the run waits out would be taken for a hang; raise train.hang_timeout_s (e.g. "
           f"{wait + 300:g}) or lower data.storage_retry_seconds")
    longest = max(t.hang_timeout_s, wait)
    _check(t.collective_timeout_s > longest,
           f"train.collective_timeout_s={t.collective_timeout_s:g} must exceed train.hang_timeout_s and "
           f"data.storage_retry_seconds ({longest:g} s): a collective would time out during a wait the run makes "
           f"on purpose; raise it (e.g. {2 * longest:g})")


def _validate_eval(e: EvalConfig, m: ModelConfig) -> None:
    _one_of("eval.metric", e.metric, ("auto", "fid", "fvd"))
    _one_of("eval.order", e.order, ("all", "newest", "milestones"))
    _check(e.sampler in ("", "ddpm", "ddim"), f"eval.sampler={e.sampler!r} is not one of '', ddpm, ddim")
    _check(e.num_samples >= 2 and e.batch >= 1, "eval.num_samples must be at least 2 and eval.batch at least 1")
    _check(e.chunk >= 1 and e.keep_unscored >= 0, "eval.chunk must be at least 1 and eval.keep_unscored 0 or more")
    _check(e.reference_samples == 0 or e.reference_samples >= 2,
           "eval.reference_samples must be 0 (all) or at least 2")
    _check(e.claim_timeout > 0, "eval.claim_timeout must be positive (seconds)")
    if e.metric == "fvd":
        _check(m.is_video, "eval.metric=fvd needs a video model (model.frames > 0)")
    if e.metric == "fid":
        _check(not m.is_video, "eval.metric=fid is for images: use eval.metric=fvd for video")


def check_world(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro_batch, accumulation) for this world size, or a ConfigError naming the fix."""
    t = cfg.train
    if t.global_batch % world_size:
        fits = [w for w in range(1, t.global_batch + 1) if t.global_batch % w == 0]
        near = sorted({max((w for w in fits if w < world_size), default=1),
                       min((w for w in fits if w > world_size), default=t.global_batch)})
        raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by the world size {world_size}: "
                          f"run on {' or '.join(map(str, near))} ranks to keep it, or set train.global_batch to a "
                          f"multiple of {world_size} (which changes the training recipe)")
    per_rank = t.global_batch // world_size
    micro = t.micro_batch or per_rank
    _check(per_rank % micro == 0,
           f"train.micro_batch={micro} does not divide the per-rank batch {per_rank} "
           f"(train.global_batch={t.global_batch} / {world_size} ranks): choose a divisor of {per_rank}")
    return micro, per_rank // micro


def _divisor_near(n: int, p: int) -> int:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return min(divs, key=lambda d: (abs(d - p), d))


def reference_markdown() -> str:
    """The config reference table: every key, its default and its help text."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section in ("model", "diffusion", "data", "train", "eval"):
        for f in dataclasses.fields(typing.get_type_hints(Config)[section]):
            meaning = f.metadata["help"].replace("|", "\\|")  # a table cell cannot hold a bare |
            rows.append(f"| `{section}.{f.name}` | `{f.default!r}` | {meaning} |")
    return "\n".join(rows)


REFERENCE_INTRO = """# Config reference

Every key of the config, its default and its meaning. A config is built in this order, each step
overriding the one before: the preset named first (default `tiny`; `rin_scale/presets.py`), then
YAML files and `section.key=value` overrides in the order given on the command line (a YAML file
may start with `preset: NAME`). Types and allowed values are checked before anything expensive
starts, and the resolved config is written to `RUN/config.yaml` with secrets masked.

    python -m rin_scale.train cifar10 my_run.yaml train.lr=2e-3 --dry-run   # prints the resolved config

The defaults below are the dataclasses' own; a preset overrides many of them
(`python -m rin_scale.train PRESET --dry-run` shows a preset's values).

This page is written by `python -m rin_scale.config docs/config.md`; a test fails when it is stale.

"""


def reference_page() -> str:
    """docs/config.md: how configs combine, then the reference table."""
    return REFERENCE_INTRO + reference_markdown() + "\n"


if __name__ == "__main__":  # python -m rin_scale.config [FILE]: the reference page, printed or written
    import sys

    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(reference_page())
    else:
        print(reference_page(), end="")
