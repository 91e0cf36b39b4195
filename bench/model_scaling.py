"""How RIN's cost grows with resolution, against a plain ViT over all interface tokens.

    .venv/bin/python bench/model_scaling.py [--quick] [--threads N]   (about 30 s)

For images of 64 (patch 4), 128 (patch 4), 256, 512, 1024 (patch 8) and the kinetics600 clip
(16x64x64, 2x4x4 patches), prints a markdown table of interface tokens, parameters, forward GFLOPs
(torch's FlopCounterMode, batch 1) and the CPU forward+backward time and peak memory at batch 1, for
a narrow RIN (interface 64, latents 64 x 128, 2 blocks x 2 layers) and for a ViT of the latent
width and depth (4 pre-LN layers of width 128) over all interface tokens: the cost RIN avoids.
It also gives the forward GFLOPs of the full-size preset at each resolution. Memory is the MB of
tensors saved for the backward pass (activation memory), counted by autograd's saved-tensor hooks;
time is the median of --reps runs after one warm-up (noisy on a shared machine).
ViT timings whose forward would exceed --vit-max-gflops are skipped (marked) but their FLOPs are
always counted, on the meta device.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rin_scale import flops  # noqa: E402
from rin_scale.config import ModelConfig  # noqa: E402
from rin_scale.model import RIN, SelfAttend, layer_norm  # noqa: E402
from rin_scale.presets import get_preset  # noqa: E402

ROWS = [  # (label, image size, patch, frames, cond frames, patch frames, full preset)
    ("64", 64, 4, 0, 0, 1, "imagenet64_p4"),
    ("128", 128, 4, 0, 0, 1, "imagenet128"),
    ("256", 256, 8, 0, 0, 1, "imagenet256"),
    ("512", 512, 8, 0, 0, 1, "imagenet512"),
    ("1024", 1024, 8, 0, 0, 1, "imagenet1024"),
    ("video 16x64x64", 64, 4, 16, 5, 2, "kinetics600"),
]


def narrow(size, patch, frames, cond, pframes) -> ModelConfig:
    return ModelConfig(image_size=size, channels=3, patch_size=patch, frames=frames, cond_frames=cond,
                       patch_frames=pframes, interface_dim=64, interface_mlp_ratio=2, latent_dim=128,
                       num_latents=64, latent_mlp_ratio=4, num_blocks=2, latent_layers=2, latent_heads=4,
                       read_write_heads=4, dropout=0.0, drop_path=0.0, num_classes=0, class_dropout=0.0)


class ViT(nn.Module):
    """Patchify -> LN + positions -> `depth` pre-LN transformer layers over every token -> readout."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.rin = RIN(m)  # borrow its stem, positions, readout and input layout
        self.rin.blocks = nn.ModuleList()
        d = m.interface_dim
        w = m.latent_dim
        self.up, self.down = nn.Linear(d, w), nn.Linear(w, d)
        self.layers = nn.ModuleList(SelfAttend(w, m.latent_heads, m.latent_mlp_ratio, 0.0, 0.0)
                                    for _ in range(m.num_blocks * m.latent_layers))
        self.norm = layer_norm(w)

    def forward(self, x_t, gamma, labels=None, prev_latents=None, cond=None):
        m = self.rin.cfg
        clip = torch.cat([cond, x_t], dim=2) if m.is_video and m.cond_frames else x_t
        h = self.up(self.rin.tokenize(clip))
        for layer in self.layers:
            h = layer(h)
        out = self.rin.untokenize(self.down(self.norm(h)))
        return (out[:, :, m.cond_frames:] if m.is_video and m.cond_frames else out), None


def inputs(m: ModelConfig, device="cpu"):
    s = m.image_size
    if m.is_video:
        x = torch.randn(1, 3, m.pred_frames, s, s, device=device)
        cond = torch.randn(1, 3, m.cond_frames, s, s, device=device) if m.cond_frames else None
    else:
        x, cond = torch.randn(1, 3, s, s, device=device), None
    return x, torch.full((1,), 0.5, device=device), cond


def build(kind: str, m: ModelConfig):
    return RIN(m) if kind == "rin" else ViT(m)


def count_gflops(kind: str, m: ModelConfig) -> tuple[int, float]:
    if kind == "rin":
        c = flops.count(m)
        return c["params"], c["gflops"]
    with torch.device("meta"):
        model = build(kind, m)
        x, g, cond = inputs(m, "meta")
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x, g, None, None, cond)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 1e9


def time_one(kind: str, row: int, reps: int) -> dict:
    """Forward+backward at batch 1 on the CPU: median ms, and the MB of tensors saved for the
    backward pass (the activation memory that checkpointing trades for compute)."""
    _, size, patch, frames, cond, pf, _ = ROWS[row]
    m = narrow(size, patch, frames, cond, pf)
    torch.manual_seed(0)
    model = build(kind, m)
    x, g, c = inputs(m)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # also the warm-up
        out, _ = model(x, g, None, None, c)
    out.square().mean().backward()
    model.zero_grad(set_to_none=True)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out, _ = model(x, g, None, None, c)
        out.square().mean().backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"ms": 1000 * statistics.median(times), "mb": sum(saved.values()) / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--vit-max-gflops", type=float, default=50.0,
                    help="skip ViT timings whose forward needs more GFLOPs than this")
    ap.add_argument("--quick", action="store_true", help="FLOPs only, no timings")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    print(f"CPU forward+backward at batch 1, {a.threads} threads, median of {a.reps}; "
          f"narrow RIN: interface 64, 64 x 128 latents, 2 blocks x 2 layers; ViT: 4 layers x 128 over all tokens\n")
    print("| input | tokens | full preset GFLOPs | RIN params | RIN GFLOPs | RIN ms | RIN act. MB "
          "| ViT params | ViT GFLOPs | ViT ms | ViT act. MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (label, size, patch, frames, cond, pf, preset) in enumerate(ROWS):
        m = narrow(size, patch, frames, cond, pf)
        full = flops.count(get_preset(preset).model)
        cells = [label, str(flops.count(m)["interface_tokens"]), f"{full['gflops']:.1f} ({preset})"]
        for kind in ("rin", "vit"):
            params, gf = count_gflops(kind, m)
            cells += [f"{params / 1e6:.2f}M", f"{gf:.2f}"]
            if a.quick:
                cells += ["-", "-"]
            elif kind == "vit" and gf > a.vit_max_gflops:
                cells += [f"skipped (> {a.vit_max_gflops:g} GFLOPs)", "-"]
            else:
                r = time_one(kind, i, a.reps)
                cells += [f"{r['ms']:.0f}", f"{r['mb']:.0f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
