"""Continuous-time Gaussian diffusion for RIN: schedules, the training loss with latent
self-conditioning, and DDPM / DDIM samplers that carry the latents from step to step.

`model` is anything with RIN's forward signature (an nn.Module, a DeepSpeed engine):
`out, latents = model(x_t, gamma, labels, prev_latents, cond)`. The network is always given
gamma = alpha_bar(t), never t, so the training and sampling schedules may differ.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .config import ConfigError, DiffusionConfig, guidance_problem

GAMMA_MIN = 1e-9


def gamma_fn(t, schedule: str, cfg: Optional[DiffusionConfig] = None) -> torch.Tensor:
    """alpha_bar(t) for t in [0, 1] (1 = clean at t=0, ~0 = pure noise at t=1), in [1e-9, 1]."""
    t = torch.as_tensor(t).double()
    if schedule == "sigmoid":
        cfg = cfg or DiffusionConfig()
        start, end, tau = cfg.sigmoid_start, cfg.sigmoid_end, cfg.sigmoid_tau
        v_start, v_end = 1 / (1 + math.exp(-start / tau)), 1 / (1 + math.exp(-end / tau))
        g = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    elif schedule == "cosine":
        g = torch.cos((t + 2e-4) / (1 + 2.5e-4) * math.pi / 2) ** 2
    elif schedule == "linear":
        g = 1 - t
    else:
        raise ConfigError(f"unknown schedule '{schedule}': use sigmoid, cosine or linear")
    return g.clamp(GAMMA_MIN, 1.0).float()


def _unwrap(model):
    """The RIN inside a wrapper (DeepSpeed engine, DDP), or the model itself."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def _target(x0, eps, gamma, kind: str):
    g = _bcast(gamma, x0)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return g.sqrt() * eps - (1 - g).sqrt() * x0
    raise ConfigError(f"unknown diffusion.target '{kind}': use eps, x0 or v")


def predict_x0(out, x_t, gamma, kind: str, clip: float):
    """x0 from the network output, clipped to [-clip, clip] (the input scale b)."""
    g = _bcast(gamma, x_t)
    if kind == "eps":
        x0 = (x_t - (1 - g).sqrt() * out) / g.sqrt()
    elif kind == "x0":
        x0 = out
    elif kind == "v":
        x0 = g.sqrt() * x_t - (1 - g).sqrt() * out
    else:
        raise ConfigError(f"unknown diffusion.target '{kind}': use eps, x0 or v")
    return x0.clamp(-clip, clip)


def _rand(shape, generator, device, dtype=torch.float32, normal=False):
    fn = torch.randn if normal else torch.rand
    if isinstance(generator, (list, tuple)):  # one generator per sample: its noise whatever the batch
        return torch.cat([_rand((1, *shape[1:]), g, device, dtype, normal) for g in generator])
    # Draw on the generator's device (CPU generators cannot fill CUDA tensors), then move.
    gdev = generator.device if generator is not None else device
    return fn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


def training_loss(model, x0, cfg: DiffusionConfig, labels=None, cond=None, generator=None):
    """MSE of the network's prediction of the target at t ~ U(0, 1).

    Latent self-conditioning: a first pass with no previous latents runs under no_grad, and each
    example keeps its latents with probability `self_cond_rate` (per example, not one coin per
    batch, so every rank does the same work and every parameter gets a gradient). The first pass
    always runs when the rate is > 0, so that ZeRO-3 ranks gather parameters in step.
    Returns (loss, details) with per-example `loss`, `t`, `gamma` and the `self_cond` mask.
    """
    b, device = x0.shape[0], x0.device
    if cfg.input_scale != 1:  # (x * 1.0 == x: no image-sized copy at scale 1)
        x0 = x0 * cfg.input_scale
        if cond is not None:
            cond = cond * cfg.input_scale
    t = _rand((b,), generator, device)
    gamma = gamma_fn(t, cfg.schedule, cfg).to(device)
    eps = _rand(x0.shape, generator, device, x0.dtype, normal=True)
    g = _bcast(gamma, x0)
    x_t = g.sqrt() * x0 + (1 - g).sqrt() * eps

    net = _unwrap(model)
    m = getattr(net, "cfg", None)
    if labels is not None and m is not None and getattr(m, "num_classes", 0) > 0:
        labels = torch.where(labels < 0, torch.full_like(labels, m.num_classes), labels)
        if m.class_dropout > 0:  # label dropout, for classifier-free guidance
            drop = _rand((b,), generator, device) < m.class_dropout
            labels = torch.where(drop, torch.full_like(labels, m.num_classes), labels)

    prev = None
    mask = torch.zeros(b, dtype=torch.bool, device=device)
    if cfg.self_cond_rate > 0:
        with torch.no_grad():
            _, latents = model(x_t, gamma, labels, None, cond)
        mask = _rand((b,), generator, device) < cfg.self_cond_rate
        prev = (latents * mask.view(-1, 1, 1).to(latents.dtype)).detach()
    out, _ = model(x_t, gamma, labels, prev, cond)
    target = _target(x0, eps, gamma, cfg.target)
    # (out - target)^2 as F.mse_loss computes it: the same numbers as .sub().pow(2), but the
    # backward pass keeps the two inputs it already has instead of an image-sized difference.
    per_example = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)
    details = {"loss": per_example.detach(), "t": t, "gamma": gamma, "self_cond": mask}
    return per_example.mean(), details


@torch.no_grad()
def sample(model, shape, cfg: DiffusionConfig, labels=None, cond=None, steps=None, sampler=None,
           noise=None, generator=None, guidance=None):
    """Generate x0 in [-1, 1] by `steps` network calls under cfg.sample_schedule.

    Each step passes the previous step's latents (the warm start; no extra passes) and the last x0
    prediction, clipped to [-b, b], is returned divided by the input scale b. DDPM uses the large
    (beta) variance; DDIM is deterministic. With guidance w > 0 the conditional and unconditional
    halves run in one batched call per step: (1 + w) cond - w uncond.
    """
    steps = int(steps or cfg.sample_steps)
    sampler = sampler or cfg.sampler
    w = cfg.guidance if guidance is None else guidance
    if sampler not in ("ddpm", "ddim"):
        raise ConfigError(f"unknown sampler '{sampler}': use ddpm or ddim")
    if steps < 1:
        raise ConfigError("steps must be at least 1")
    net = _unwrap(model)
    try:
        device = next(net.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    if noise is not None:
        device = noise.device
    dtype = torch.float32  # the sampler's state stays fp32 even for a bf16 network
    b_scale = cfg.input_scale
    x = noise.to(device, dtype) if noise is not None else _rand(tuple(shape), generator, device, dtype, normal=True)
    if cond is not None:
        cond = cond.to(device, dtype) * b_scale

    guided = w and w > 0
    if guided:
        net_cfg = getattr(net, "cfg", None)
        problem = guidance_problem(net_cfg) if net_cfg is not None else "needs a class-conditional model"
        if problem or labels is None:
            raise ConfigError(f"guidance > 0: {problem or 'needs labels to guide towards'}")
        num_classes = net_cfg.num_classes
        labels = labels.to(device)
        labels = torch.cat([labels, torch.full_like(labels, num_classes)])
        cond = torch.cat([cond, cond]) if cond is not None else None

    latents = None
    x0 = x
    for i in range(steps):
        t_now = torch.tensor(1.0 - i / steps)
        t_next = torch.tensor(max(1.0 - (i + 1) / steps, 0.0))
        g_now = gamma_fn(t_now, cfg.sample_schedule, cfg).to(device)
        g_next = gamma_fn(t_next, cfg.sample_schedule, cfg).to(device)
        b = x.shape[0]
        x_in = torch.cat([x, x]) if guided else x
        gamma = g_now.expand(x_in.shape[0]).to(torch.float32)
        out, latents = model(x_in, gamma, labels, latents, cond)
        if guided:
            c, u = out[:b], out[b:]
            out = (1 + w) * c - w * u
        x0 = predict_x0(out.to(dtype), x, g_now.expand(b), cfg.target, b_scale)
        eps = (x - g_now.sqrt() * x0) / (1 - g_now).clamp_min(1e-12).sqrt()
        if i == steps - 1:
            break
        if sampler == "ddim":
            x = g_next.sqrt() * x0 + (1 - g_next).sqrt() * eps
        else:
            alpha = g_now / g_next
            mean = (x - (1 - alpha) / (1 - g_now).sqrt() * eps) / alpha.sqrt()
            z = _rand(x.shape, generator, device, dtype, normal=True)
            x = mean + (1 - alpha).clamp_min(0).sqrt() * z
    return x0 / b_scale


def sample_clip(model, cond, frames: int, cfg: DiffusionConfig, **kw):
    """A video model's continuation of `cond` (B, C, k, H, W) to `frames` frames in all: the predicted
    frames (B, C, frames - k, H, W) in [-1, 1]. A clip longer than the model's window (model.frames)
    is extended autoregressively: each sample() call is conditioned on the last model.cond_frames
    frames, given or already predicted, and adds model.pred_frames. kw: sample()'s options."""
    m = _unwrap(model).cfg
    k = cond.shape[2]
    if frames <= k:
        raise ConfigError(f"a clip of {frames} frames has nothing to predict after {k} given frames")
    clip = cond.float()
    while clip.shape[2] < frames:
        given = clip[:, :, -m.cond_frames:]
        x = sample(model, (len(clip), *m.sample_shape), cfg, cond=given, **kw).float().clamp(-1, 1)
        clip = torch.cat([clip, x], dim=2)
    return clip[:, :, k:frames]
