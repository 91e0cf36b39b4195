"""Named presets. Each is a function returning a fresh Config; `PRESETS` is the registry.

The authors published configs for CIFAR-10 and ImageNet-64 (RIN_SPEC.md); the others are chosen
from the paper's reported parameters and GFLOPs, as each docstring says.
"""
from __future__ import annotations

from typing import Callable

from .config import Config, ConfigError, DataConfig, DiffusionConfig, EvalConfig, ModelConfig, TrainConfig

PRESETS: dict[str, Callable[[], Config]] = {}


def preset(fn: Callable[[], Config]) -> Callable[[], Config]:
    PRESETS[fn.__name__] = fn
    return fn


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    cfg.name = name
    return cfg


@preset
def tiny() -> Config:
    """About 1.5M parameters at 16x16, class-conditional: trains in minutes on a 2-core CPU.

    Patch 4 (16 interface tokens): the interface has no self-attention, so a token denoises its own
    pixels from its patch and the latents alone; a 4x4 patch (2x2 pixels of the digits' 8x8 source)
    gives it that context, and a step costs ~2/3 of patch 2's. Measured with bench/self_cond.py at
    equal CPU time (900 steps of patch 4 vs 600 of patch 2): train loss 0.127 vs 0.136, domain FID 49.5
    vs 62.0, Laplacian ratio 1.86 vs 2.85; patch 1 (interface 64) had a higher loss at equal steps.

    No label dropout, as the authors' class-conditional CIFAR-10: the demo scores samples without
    guidance, and at 2,400 demo steps dropping 10% of the labels cost class accuracy (90.2% vs 93.6%)
    and domain FID (14.1 vs 12.8), one run each. So no classifier-free guidance for this preset.

    Three read-write rounds of one latent layer each, not two of two: at the demo's 2,400 steps
    domain FID 10.47 / 10.39 against 12.83 / 20.00 and class accuracy 94.0% / 92.4% against
    93.6% / 87.6% (seeds 0 / 1), for about 5% more training time.

    Positions: the authors' fixed 2-D sin-cos codes plus a learned residual from zero
    (`sin_cos_plus_learned`), not learned ones at std 0.02, whose place signal starts ~50x below the
    stem's unit-scale features: at the demo's 2,400 steps domain FID 7.80 / 8.07 against
    10.47 / 10.39, class accuracy 97.2% / 94.0% against 94.0% / 92.4%, Laplacian ratio 1.34 / 1.41
    against 1.46 / 1.49 (seeds 0 / 1).

    Samples with DDPM 100, not DDIM 50: on the final snapshots of the two seeds above, domain FID
    6.61 / 7.62 against 7.80 / 8.07, class accuracy 95.4% / 94.2% against 97.2% / 94.0% (DDIM 100:
    7.95 / 96.8% on seed 0; DDPM 200: 7.17 / 93.6% on seed 1), for twice the sampling steps.

    Learning rate 3e-3, not 2e-3 (sampled with DDPM 100): domain FID 6.16 / 6.28 against
    6.61 / 7.62, class accuracy 95.4% / 94.0% against 95.4% / 94.2%. With learned positions 3e-3
    diverged at step ~300 with 4 blocks; with these positions 4 blocks passed its peak (step 800).

    Input scale 0.5 (Chen 2023's input scaling: x0 in [-0.5, 0.5], so each noise level hides more of
    the image): the digits are 8x8 images upsampled to 16x16, smooth like a larger image, whose
    pixels the noise hides less than a true 16x16 image's. At the demo's 3,000 steps (Intel Xeon
    with AMX) domain FID 3.41 / 5.62 against 6.90 / 9.05, class accuracy 95.8% / 95.8% against
    94.6% / 88.8%, Laplacian ratio 1.23 / 1.35 against 1.36 / 1.41 (seeds 0 / 1); seed 0 at 0.7,
    0.35 and 0.25: 4.88 / 94.8%, 5.85 / 95.8%, 31.05 / 57.8%.

    AdamW beta2 0.99, not 0.999 (EDM2's training loop uses 0.99): the second moment follows the
    gradients' shrinking scale over ~100 steps instead of ~1,000, a third of this run. At the demo's
    3,000 steps (Intel Xeon with AMX) domain FID 2.52 / 3.05 against 3.41 / 5.62, class accuracy
    96.4% / 96.6% against 95.8% / 95.8%, Laplacian ratio 1.09 / 1.20 against 1.23 / 1.35 (seeds
    0 / 1); beta2 0.95 on seed 0: 2.85 / 96.4% / 1.20. At beta2 0.99 a learning rate of 4e-3 scored
    7.22 / 95.4% / 1.40 (seed 0), 2e-3 3.14 / 96.6% / 1.22 and 3.10 / 97.2% / 1.16; 5e-3 diverged
    (at beta2 0.999: the loss was back at 0.6 by step 600).

    EMA warmup offset 20, not 10: decay min(0.999, (1 + step) / (20 + step)) averages about the last
    step / 19 steps (EDM2's relative std 0.047 instead of 0.09). At the demo's 3,000 steps (Intel Xeon)
    domain FID 2.45 / 2.96 against 2.52 / 3.05, Laplacian ratio 1.07 / 1.18 against 1.09 / 1.20,
    class accuracy 96.2% / 96.6% against 96.4% / 96.6% (seeds 0 / 1): small, within about the seed
    noise, but on both seeds. Offset 40 (seed 0): 2.45 / 96.8% / 1.07; offset 5 (longer): 3.19 /
    97.0% / 1.16.

    Warmup 300 steps, not 100. A run first sits on a plateau at the loss of predicting the data
    mean (~0.55) and leaves it once the latents carry the input; warming up to 3e-3 in 100 steps,
    that exit came late: in process (bench/_inproc.py's loop, fp32, constant lr after the warmup),
    4 of 6 seeds were still on the plateau at step 200 and above a loss of 0.3 at step 300, one
    until past step 900; the 2-process trainer in fp32 left it at step ~225 on 1 of 3 seeds (in
    bf16 by step 175 on all 6). With 300 steps all 6 in-process seeds left it by step 200, and at
    a constant 3e-3 for 2,400 steps training went on smoothly (domain FID 9.3 and class accuracy
    94% on 100 samples, where warmup 100 scored 49.9 and 7%). At the demo's 3,000 steps (AMD EPYC)
    domain FID 1.85 / 1.65, class accuracy 97.0% / 97.6%, Laplacian ratio 1.07 / 1.05 (seeds 0 / 1;
    warmup 100, seed 0: 2.97 / 96.0% / 1.11; README). lr 2e-3 with warmup 100 also left the
    plateau on all 6 seeds, but scored 2.96 / 96.0% / 1.22.

    Pairs with the embedded digits dataset (data_tools.embedded), the demo's default. Predicts v:
    with eps, x0 = (x_t - sqrt(1 - gamma) eps) / sqrt(gamma) multiplies the network's error by up to
    1e4 at the first sampling steps, and a model this small and this briefly trained samples noise
    (measured: chance-level class accuracy after 1,500 steps with eps, 94% with v).
    """
    return Config(
        model=ModelConfig(image_size=16, channels=3, patch_size=4, interface_dim=96, interface_mlp_ratio=2,
                          latent_dim=128, num_latents=16, latent_mlp_ratio=4, num_blocks=3, latent_layers=1,
                          latent_heads=4, read_write_heads=4, dropout=0.0, drop_path=0.0, num_classes=10,
                          class_dropout=0.0, pos_encoding="sin_cos_plus_learned"),
        diffusion=DiffusionConfig(schedule="sigmoid", target="v", sample_steps=100, sampler="ddpm", input_scale=0.5),
        data=DataConfig(workers=1, shuffle_buffer=500, hflip=False),
        train=TrainConfig(run_dir="runs/tiny", global_batch=64, total_steps=2000, zero_stage=2,
                          optimizer="adamw", lr=3e-3, betas=(0.9, 0.99), weight_decay=0.01, warmup_steps=300,
                          lr_floor=0.1, ema_decay=0.999, ema_warmup=True, ema_warmup_offset=20.0,
                          state_every=250, snapshot_every=250,
                          log_every=25, sample_every=250, sample_count=20),
        eval=EvalConfig(num_samples=500, batch=100),
    )


@preset
def tiny_video() -> Config:
    """A small frame-conditioned video RIN that predicts one 16x16 frame from the two before it and
    extends a clip one frame at a time (eval.frames=8: 2 given, 6 predicted). The given frames are
    stacked onto the predicted frame's channels (model.cond_mode=channels: 9 input channels, 4x4
    patches, 16 interface tokens), so the pixels to move sit in the same or a neighbouring token
    and a motion of 1-2 pixels a frame is a local operation; the interface conv (kernel 3, the
    authors' option) reaches the neighbours. The authors' sin-cos positions and Glorot read/write
    outputs, 4 blocks of 1 layer, x0 prediction. The authors' layout (the whole clip tokenized,
    the given frames along time) routed nothing of the given digit through the latents (README).

    Departures from the paper's recipe, measured with bench/video_demo.py (batch 16, 64 held-out
    clips; repeat-last-frame baseline 0.216, data mean 0.106; README):
    - no latent self-conditioning: it bought nothing per step here and cost 1.18x in the trainer;
    - a training schedule shifted to more noise, where the given frames are all the model has to
      go on (sigmoid from 0, not -3: gamma < 0.1 on 27% of the draws, against 21%). With both, in
      the same training time, per-frame MSE 0.113 and 0.126 on seeds 0 and 1 against 0.138 and
      0.136; sigmoid_tau=0.5 as well lowered it further but lost the digits' tint at the demo's
      3,000 steps (kept at 12,000);
    - AdamW at 1e-3: at 2e-3 every run longer than the demo's diverged (24,000 steps in process:
      by step 4,800, with or without grad_clip 1; the demo at 16,000 steps: at step 2,625), where
      1e-3 trained 24,000 steps to 85.9% and 85.2% recognised (seeds 0, 1). At the demo's 3,000
      steps it costs a little (three seeds: per-frame MSE 0.127-0.132 against 0.118-0.121, 14.8%
      recognised against 16.9%), a price for a preset that does not lose a longer run. The image
      demo's input scale 0.5 and beta2 0.99 collapsed to a constant output at 2e-3.
    DDIM 20 samples as well as 50 (0.079 and 30.7% against 0.080 and 28.9%, a 6,000-step model)."""
    return Config(
        model=ModelConfig(image_size=16, channels=3, frames=3, cond_frames=2, cond_mode="channels", patch_frames=1,
                          patch_size=4, interface_dim=96, interface_mlp_ratio=2, latent_dim=128, num_latents=16,
                          latent_mlp_ratio=4, num_blocks=4, latent_layers=1, latent_heads=4, read_write_heads=4,
                          dropout=0.0, drop_path=0.0, num_classes=0, pos_encoding="sin_cos_plus_learned",
                          rw_out_init="glorot", conv_kernel_size=3),
        diffusion=DiffusionConfig(schedule="sigmoid", sigmoid_start=0.0, self_cond_rate=0.0,
                                  target="x0", sample_steps=20, sampler="ddim"),
        data=DataConfig(kind="video", workers=1, shuffle_buffer=500, hflip=False),
        train=TrainConfig(run_dir="runs/tiny_video", global_batch=16, total_steps=3000, zero_stage=2,
                          optimizer="adamw", lr=1e-3, weight_decay=0.01, warmup_steps=100, lr_floor=0.1,
                          ema_decay=0.999, ema_warmup=True, state_every=250, snapshot_every=250, log_every=25,
                          sample_every=250, sample_count=20),
        eval=EvalConfig(metric="fvd", num_samples=64, batch=16, frames=8),
    )


@preset
def cifar10() -> Config:
    """The authors' CIFAR-10 config (the one behind FID 1.81): class-conditional with no label
    dropout (126 learned latents + time + class), 3 blocks x 2 layers, 128 x 512 latents, 256-wide
    interface, patch 2 (256 tokens), about 31.0M parameters; sigmoid(-3, 3, 0.9); LAMB 3e-3 (eps 1e-8,
    no trust ratio or decay on biases and LayerNorms, embeddings decayed), 10k warmup then the
    authors' cosine@0.8 (ends at 0.095 lr), batch 256; Glorot read/write outputs (bench/recipe_init.py:
    zero ones stay ~1e-4 under LAMB until ~90% of the warmup, and the loss is higher at every step)."""
    return Config(
        model=ModelConfig(image_size=32, channels=3, patch_size=2, interface_dim=256, interface_mlp_ratio=2,
                          latent_dim=512, num_latents=128, latent_mlp_ratio=4, num_blocks=3, latent_layers=2,
                          latent_heads=16, read_write_heads=8, dropout=0.1, drop_path=0.1, num_classes=10,
                          class_dropout=0.0, rw_out_init="glorot"),
        diffusion=DiffusionConfig(schedule="sigmoid", sigmoid_start=-3, sigmoid_end=3, sigmoid_tau=0.9,
                                  sampler="ddpm", sample_schedule="cosine", sample_steps=1000),
        train=TrainConfig(run_dir="runs/cifar10", global_batch=256, total_steps=150_000, optimizer="lamb",
                          lr=3e-3, weight_decay=0.01, no_decay_embeddings=False, warmup_steps=10_000,
                          lr_floor=0.0, lr_cosine_fraction=0.8, ema_decay=0.9999),
        eval=EvalConfig(num_samples=50_000),
    )


@preset
def cifar10_uncond() -> Config:
    """cifar10 without the class token (127 learned latents + time): unconditional CIFAR-10."""
    cfg = cifar10()
    cfg.model.num_classes = 0
    cfg.train.run_dir = "runs/cifar10_uncond"
    return cfg


@preset
def imagenet64() -> Config:
    """The authors' released ImageNet-64 config: 4 blocks x 4 layers, 128 x 768 latents, 512-wide
    interface (MLP ratio 4), patch 8, about 158M parameters; linear schedule; LAMB 2e-3 (as cifar10's),
    10k warmup then the authors' cosine@0.7 (ends at 0.206 lr), batch 1024; Glorot read/write outputs,
    the authors' (bench/recipe_init.py: zero ones cannot reach Glorot's norm under LAMB within the
    warmup; at reduced size zero init had the lower loss from step 1k to 5k, 0.0623 vs 0.0651 at
    5k, while its read still routed nothing; README)."""
    return Config(
        model=ModelConfig(image_size=64, channels=3, patch_size=8, interface_dim=512, interface_mlp_ratio=4,
                          latent_dim=768, num_latents=128, latent_mlp_ratio=4, num_blocks=4, latent_layers=4,
                          latent_heads=16, read_write_heads=16, dropout=0.0, drop_path=0.0, num_classes=1000,
                          class_dropout=0.0, rw_out_init="glorot"),
        diffusion=DiffusionConfig(schedule="linear", sampler="ddpm", sample_schedule="cosine", sample_steps=1000),
        train=TrainConfig(run_dir="runs/imagenet64", global_batch=1024, total_steps=150_000, optimizer="lamb",
                          lr=2e-3, weight_decay=0.01, no_decay_embeddings=False, warmup_steps=10_000,
                          lr_floor=0.0, lr_cosine_fraction=0.7, ema_decay=0.9999),
        eval=EvalConfig(num_samples=50_000),
    )


@preset
def imagenet64_p4() -> Config:
    """ImageNet-64 at the paper's patch 4 (256 interface tokens); otherwise the released config."""
    cfg = imagenet64()
    cfg.model.patch_size = 4
    cfg.train.run_dir = "runs/imagenet64_p4"
    return cfg


def _imagenet_large(size: int, patch: int, latents: int, input_scale: float) -> Config:
    """No released config: chosen from the paper's figures (about 410M parameters at 256 and
    194 / 334 / 425 GFLOPs at 128 / 256 / 512). 6 blocks x 4 layers of width 1024 (about 396M
    parameters), a 512-wide interface, 16 heads; the number of latents sets the GFLOPs (counted by
    rin_scale.flops): 192 at 128 (~191 GFLOPs), 368 at 256 (~336), 304 at 512 (~423). Input
    scaling (Chen 2023) from 256 on."""
    cfg = imagenet64()
    m = cfg.model
    m.image_size, m.patch_size = size, patch
    m.num_blocks, m.latent_layers, m.num_latents, m.latent_dim = 6, 4, latents, 1024
    m.interface_dim, m.interface_mlp_ratio, m.latent_heads, m.read_write_heads = 512, 4, 16, 16
    cfg.diffusion.schedule = "sigmoid"
    cfg.diffusion.input_scale = input_scale
    cfg.train.run_dir = f"runs/imagenet{size}"
    cfg.train.activation_checkpointing = 1
    cfg.train.lr = 1e-3
    return cfg


@preset
def imagenet128() -> Config:
    """Paper: patch 4 (1,024 tokens), 194 GFLOPs. 192 latents: ~191 GFLOPs, ~396M parameters."""
    return _imagenet_large(128, 4, 192, 1.0)


@preset
def imagenet256() -> Config:
    """Paper: patch 8 (1,024 tokens), 410M parameters, 334 GFLOPs. 368 latents: ~336 GFLOPs, ~396M."""
    return _imagenet_large(256, 8, 368, 0.5)


@preset
def imagenet512() -> Config:
    """Paper: patch 8 (4,096 tokens), 425 GFLOPs. 304 latents: ~423 GFLOPs, ~398M parameters."""
    return _imagenet_large(512, 8, 304, 0.5)


@preset
def imagenet1024() -> Config:
    """16,384 interface tokens at patch 8. The paper gives no size: imagenet512's model (304
    latents), so the extra cost over 512 is only the interface's, linear in the pixels."""
    return _imagenet_large(1024, 8, 304, 0.5)


@preset
def kinetics600() -> Config:
    """Kinetics-600 frame prediction, 16x64x64 clips (5 given, 11 predicted), 2x4x4 patches over the
    whole clip (2,048 tokens). No released config: chosen for the paper's 387 GFLOPs: 6 blocks x 4
    layers on 368 x 1024 latents, a 512-wide interface: ~384 GFLOPs, ~396M parameters."""
    cfg = imagenet64()
    m = cfg.model
    m.frames, m.cond_frames, m.patch_frames, m.patch_size = 16, 5, 2, 4
    m.num_classes, m.class_dropout = 0, 0.0
    m.num_blocks, m.latent_layers, m.num_latents, m.latent_dim = 6, 4, 368, 1024
    m.interface_dim, m.interface_mlp_ratio = 512, 4
    cfg.diffusion.schedule = "sigmoid"
    cfg.data.kind = "video"
    cfg.train.run_dir = "runs/kinetics600"
    cfg.train.global_batch = 256
    cfg.train.activation_checkpointing = 1
    cfg.eval.metric = "fvd"
    cfg.eval.num_samples = 2048
    return cfg
