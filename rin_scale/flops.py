"""FLOPs of a RIN config, counted by torch's FlopCounterMode: the forward pass and a training step.

    count(model_cfg)                                  # params, forward GFLOPs, token counts
    train_flops_per_example(model_cfg, self_cond_rate)  # FLOPs of one example's training step

The model is built on the meta device, so even 1024x1024 or Kinetics costs no memory and about a
second; results are cached per config. FLOPs count a multiply-add as 2 (torch's convention, and
the paper's GFLOPs). Training costs about 3x forward plus one no-grad forward for the
self-conditioning pass. Peaks, MFU and memory are in rin_scale.perf.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig


def count(model_cfg: ModelConfig, batch: int = 1) -> dict:
    """{"params", "gflops" (forward at `batch`), "interface_tokens", "latent_tokens"}."""
    key = tuple(sorted(dataclasses.asdict(model_cfg).items()))
    return dict(_count(key, batch))


@functools.lru_cache(maxsize=64)
def _count(key: tuple, batch: int) -> dict:
    m = ModelConfig(**dict(key))
    with torch.device("meta"):
        model, flops = _counted_forward(m, batch)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": flops / 1e9,
        "interface_tokens": model.num_tokens,
        "latent_tokens": m.num_latents,
    }


def _counted_forward(m: ModelConfig, batch: int):
    """(model, FLOPs of one forward at `batch`), on the current default device."""
    from .model import RIN

    model = RIN(m).eval()
    x = torch.zeros(batch, *m.sample_shape)
    cond = torch.zeros(batch, m.channels, m.cond_frames, m.image_size, m.image_size) \
        if m.is_video and m.cond_frames else None
    labels = torch.zeros(batch, dtype=torch.long) if m.num_classes else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, torch.full((batch,), 0.5), labels, None, cond)
    return model, float(counter.get_total_flops())


def forward_flops(model_cfg: ModelConfig) -> float:
    """Forward FLOPs of one example: counted on the meta device, or (if an op has no meta kernel)
    over a real batch-1 forward on the CPU."""
    try:
        return count(model_cfg)["gflops"] * 1e9
    except NotImplementedError:
        return _counted_forward(model_cfg, 1)[1]


def train_flops_per_example(model_cfg: ModelConfig, self_cond_rate: float) -> float:
    """FLOPs of one example's training step: 3x the forward with gradients (forward + backward)
    plus the no-grad self-conditioning forward, run on `self_cond_rate` of the examples. Counted
    as if every example ran it, since the pass runs on the whole batch (zeroed latents for 10%)."""
    fwd = forward_flops(model_cfg)
    return 3 * fwd + (fwd if self_cond_rate > 0 else 0.0)
