"""Read/write output initialisation under the presets' own optimizer (LAMB): Glorot or zero?

    OMP_NUM_THREADS=1 .venv/bin/python bench/recipe_init.py [--families cifar10 imagenet64]
        [--report 0 25 50 100 250 500] [--batch 4] [--latents 16] [--image-size N] [--out FILE.jsonl]
    .venv/bin/python bench/recipe_init.py --table FILE.jsonl      (print the table of saved runs)

The README's table (2 x 5,000 steps per family, one process per init on two cores: cifar10 63 min
while demo runs shared the cores, imagenet64 40 min):
    --families cifar10 --inits zero|glorot --image-size 16 --report 0 100 500 1000 2000 5000 --out FILE.jsonl
    --families imagenet64 --inits zero|glorot --image-size 32 --report 0 100 500 1000 2000 5000 --out ...

For each preset family the preset's model widths (interface d, latent d', MLP ratios, heads, patch,
dropout), its diffusion schedule and its optimizer exactly as the trainer builds it
(optim.make_optimizer / make_scheduler: LAMB, betas, eps, weight decay, trust-ratio exemptions,
the real 10k-step linear warmup to the real peak LR) train from the same seed, data and noise
with model.rw_out_init = zero and = glorot. Reduced to fit a CPU: the batch (--batch, preset 256 /
1024), the number of latents (--latents), the blocks x layers (--blocks, --layers) and the steps
(up to the last --report step: the first steps of the real schedule, not a shortened one: LAMB moves a tensor by
at most lr * ||w|| a step, so a warmup squeezed into fewer steps would change exactly what is
measured). Data: the embedded digits (data_tools.embedded, 1,437 train images, labels 0-9)
upscaled to the preset's image size, or to --image-size.

Printed per family and init, at each --report step: the LR, the mean Frobenius norm of the read and
of the write output projections (blocks.*.read.attn.out.weight / write), how much read and write
route ("routes": ||W_out o|| / ||stream||, the output projection without its bias applied to the
attention output, over the norm of the latents (read) or interface (write) it is added to, mean
over blocks; 0 = routing off; the bias is left out: it is the same for every token and routes
nothing), the loss on a fixed evaluation batch (64 images, fixed t and noise, dropout off,
self-conditioning as in training: first pass, then second pass with its latents) and the training
loss averaged over the steps since the previous report. For zero init, the largest write output
norm LAMB allows at a step from the size of its first update (||w_t|| <= ||w_1|| prod(1 + lr_s):
LAMB moves a non-zero tensor by lr * ||w|| a step), extended to 2k and 5k steps and the end of the
10k warmup (read's output gets no gradient while every write's is zero, so it starts a step later).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rin_scale.diffusion import _bcast, _target, gamma_fn, training_loss  # noqa: E402
from rin_scale.model import RIN  # noqa: E402
from rin_scale.optim import make_optimizer, make_scheduler  # noqa: E402
from rin_scale.presets import get_preset  # noqa: E402


def digits_tensor(size: int):
    from data_tools.embedded import digits

    imgs, labels = [], []
    for _, arr, label in digits("train", size=size):
        imgs.append(torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 127.5 - 1)
        labels.append(label)
    return torch.stack(imgs), torch.tensor(labels)


def reduced_config(family: str, init: str, a):
    cfg = get_preset(family)
    m, t = cfg.model, cfg.train
    if a.image_size:
        m.image_size = a.image_size
    m.num_latents = a.latents
    m.num_blocks, m.latent_layers = a.blocks, a.layers
    m.rw_out_init = init
    t.global_batch, t.zero_stage = a.batch, 0
    return cfg


def rw_norms(model):
    r = [b.read.attn.out.weight.norm().item() for b in model.blocks]
    w = [b.write.attn.out.weight.norm().item() for b in model.blocks]
    return sum(r) / len(r), sum(w) / len(w)


@torch.no_grad()
def evaluate(model, cfg, ev):
    """Loss on the fixed evaluation batch (dropout off), and how much read and write route: the
    norm of W_out o (the output projection without its bias, which is the same for every token and
    so routes nothing) over the norm of the stream it is added to, averaged over the blocks."""
    model.eval()
    x0, labels, t, eps = ev
    d = cfg.diffusion
    x0 = x0 * d.input_scale
    gamma = gamma_fn(t, d.schedule, d)
    g = _bcast(gamma, x0)
    x_t = g.sqrt() * x0 + (1 - g).sqrt() * eps
    _, latents = model(x_t, gamma, labels, None)
    shares = {"read": [], "write": []}
    hooks = []
    for b in model.blocks:
        for kind, cross in (("read", b.read), ("write", b.write)):
            stream = {}  # the norm of the stream the cross-attention adds to, set before it runs

            def before(mod, args, stream=stream):
                stream["norm"] = args[0].norm()

            def after(mod, args, out, stream=stream, kind=kind):
                shares[kind].append((F.linear(args[0], mod.weight).norm() / stream["norm"]).item())

            hooks.append(cross.register_forward_pre_hook(before))
            hooks.append(cross.attn.out.register_forward_hook(after))
    out, _ = model(x_t, gamma, labels, latents)
    for h in hooks:
        h.remove()
    loss = F.mse_loss(out, _target(x0, eps, gamma, d.target)).item()
    model.train()
    return loss, sum(shares["read"]) / len(shares["read"]), sum(shares["write"]) / len(shares["write"])


def zero_init_bound(cfg, first_norm: float, steps: list[int]) -> dict[int, float]:
    """||w_t|| <= ||w_1|| * prod_{s=1}^{t-1} (1 + lr_s): LAMB's step is lr * ||w|| / ||u|| * u."""
    from rin_scale.optim import WarmupCosine

    t = cfg.train
    f = WarmupCosine(t.warmup_steps, t.total_steps, t.lr_floor, t.lr_cosine_fraction)
    out, log_growth, last = {}, 0.0, 1
    for s in sorted(steps):
        for k in range(last, s):
            log_growth += math.log1p(cfg.train.lr * f(k))
        last = max(last, s)
        out[s] = first_norm * math.exp(log_growth) if s >= 1 else 0.0
    return out


def run(family: str, init: str, a, data) -> dict:
    cfg = reduced_config(family, init, a)
    images, labels = data
    torch.manual_seed(a.seed)
    model = RIN(cfg.model)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    g = torch.Generator().manual_seed(a.seed + 1)
    ev_idx = torch.randperm(len(images), generator=g)[:64]
    ev = (images[ev_idx], labels[ev_idx], torch.rand(64, generator=g), torch.randn(images[ev_idx].shape, generator=g))
    data_g = torch.Generator().manual_seed(a.seed + 2)
    noise_g = torch.Generator().manual_seed(a.seed + 3)
    rows, recent, first_norm = [], [], None
    t0 = time.time()
    report = sorted(set(a.report))
    for step in range(max(report) + 1):
        if step in report:
            loss, rshare, wshare = evaluate(model, cfg, ev)
            rn, wn = rw_norms(model)
            lr = opt.param_groups[0]["lr"]
            rows.append(dict(step=step, read=rn, write=wn, read_share=rshare, write_share=wshare, eval_loss=loss,
                             train_loss=sum(recent) / len(recent) if recent else float("nan"), lr=lr,
                             seconds=time.time() - t0))
            recent = []
            print(f"  {family} {init} step {step}: read {rn:.3g} write {wn:.3g} shares {rshare:.3g} {wshare:.3g} "
                  f"eval {loss:.4f} train {rows[-1]['train_loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
        if step == max(report):
            break
        idx = torch.randint(len(images), (a.batch,), generator=data_g)
        loss, _ = training_loss(model, images[idx], cfg.diffusion, labels=labels[idx], generator=noise_g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent.append(loss.item())
        if step == 0:  # write's output moves at step 1 (read's gradient is zero while every write is)
            first_norm = rw_norms(model)[1]
    m = cfg.model
    reduced = dict(image_size=m.image_size, batch=a.batch, latents=m.num_latents, blocks=m.num_blocks,
                   layers=m.latent_layers, interface_dim=m.interface_dim, latent_dim=m.latent_dim,
                   lr=cfg.train.lr, warmup=cfg.train.warmup_steps, eps=cfg.train.eps)
    res = dict(family=family, init=init, rows=rows, reduced=reduced)
    if init == "zero":
        extra = [1] + [r["step"] for r in rows] + [2000, 5000, cfg.train.warmup_steps]
        res["bound"] = zero_init_bound(cfg, first_norm, extra)
    return res


def table(results: list[dict]) -> str:
    lines = []
    for fam in dict.fromkeys(r["family"] for r in results):
        rs = [r for r in results if r["family"] == fam]
        red = rs[0]["reduced"]
        lines.append(f"\n{fam}: widths d={red['interface_dim']}, d'={red['latent_dim']}; reduced to "
                     f"{red['image_size']}px, batch {red['batch']}, {red['latents']} latents, "
                     f"{red['blocks']} blocks x {red['layers']} layers; LAMB lr {red['lr']:g}, warmup {red['warmup']}, "
                     f"eps {red['eps']:g}\n")
        lines.append("| init | step | LR | read out norm | write out norm | read routes | write routes | eval loss "
                     "| train loss |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in rs:
            for row in r["rows"]:
                lines.append(f"| {r['init']} | {row['step']} | {row['lr']:.2g} | {row['read']:.3g} | "
                             f"{row['write']:.3g} | {row['read_share']:.3g} | {row['write_share']:.3g} | "
                             f"{row['eval_loss']:.4f} | {row['train_loss']:.4f} |")
        for r in rs:
            if "bound" in r:
                b = {int(k): v for k, v in r["bound"].items()}
                lines.append(f"\nzero init, largest write output norm LAMB allows (from the first step's "
                             f"{b[1]:.2g}): " + ", ".join(f"step {k}: {v:.3g}" for k, v in sorted(b.items()) if k > 0))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=["cifar10", "imagenet64"])
    p.add_argument("--inits", nargs="+", default=["zero", "glorot"])
    p.add_argument("--report", nargs="+", type=int, default=[0, 25, 50, 100, 250, 500])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--image-size", type=int, default=0, help="0 = the preset's")
    p.add_argument("--latents", type=int, default=16, help="latent slots (preset: 128)")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="", help="append each run's JSON here")
    p.add_argument("--table", default="", help="only print the table of a JSON-lines file")
    a = p.parse_args(argv)
    if a.table:
        with open(a.table) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return 0
    torch.set_num_threads(a.threads)
    results = []
    for fam in a.families:
        size = a.image_size or get_preset(fam).model.image_size
        data = digits_tensor(size)
        for init in a.inits:
            res = run(fam, init, a, data)
            results.append(res)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(res) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
