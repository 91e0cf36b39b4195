"""Parameters and forward FLOPs of a RIN config, counted by torch's FlopCounterMode.

The model is built on the meta device, so even 1024x1024 or Kinetics costs no memory and about a
second; results are cached per config. FLOPs count a multiply-add as 2 (torch's convention, and
the paper's GFLOPs). Training costs about 3x forward plus one no-grad forward for the
self-conditioning pass.
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
    from .model import RIN

    m = ModelConfig(**dict(key))
    with torch.device("meta"):
        model = RIN(m).eval()
        s = m.image_size
        if m.is_video:
            x = torch.zeros(batch, m.channels, m.pred_frames, s, s)
            cond = torch.zeros(batch, m.channels, m.cond_frames, s, s) if m.cond_frames else None
        else:
            x, cond = torch.zeros(batch, m.channels, s, s), None
        gamma = torch.full((batch,), 0.5)
        labels = torch.zeros(batch, dtype=torch.long) if m.num_classes else None
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x, gamma, labels, None, cond)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": counter.get_total_flops() / 1e9,
        "interface_tokens": model.num_tokens,
        "latent_tokens": m.num_latents,
    }


def training_gflops(model_cfg: ModelConfig, batch: int = 1, self_cond_rate: float = 0.9) -> float:
    """GFLOPs of one training step: forward + backward (~2x forward), plus the no-grad
    self-conditioning forward when the rate is above zero."""
    fwd = count(model_cfg, batch)["gflops"]
    return fwd * (3 + (1 if self_cond_rate > 0 else 0))
