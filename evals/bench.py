"""What an evaluation costs here: sampling, feature extraction and the Fréchet distance.

    python -m evals.bench [--images 8] [--samples 16] [--steps 50] [--device cpu|cuda]

Prints a markdown table. Random-weight networks of the standard architectures stand in where the
weights files are missing (the cost does not depend on the weights).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def timed(fn, repeat=1):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8, help="images per Inception batch")
    p.add_argument("--samples", type=int, default=16, help="samples per tiny-preset sampling batch")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from rin_scale.config import EvalConfig, load_config
    from rin_scale.diffusion import sample
    from rin_scale.model import RIN

    from .extractors import Extractor, save_random_inception, save_standin_i3d
    from .frechet import FrechetReference

    dev = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inc = Extractor("fid", EvalConfig(inception_weights=save_random_inception(f"{tmp}/inc.pth")), dev)
        x = torch.rand(args.images, 3, 16, 16, device=dev) * 2 - 1
        s = inc.new_stats()
        t = timed(lambda: s.update(x))
        rows.append(("InceptionV3 features (16x16 -> 299x299)", f"{args.images} images", t, args.images / t, "images/s"))
        i3d = Extractor("fvd", EvalConfig(i3d_weights=save_standin_i3d(f"{tmp}/i3d.pt")), dev)
        v = torch.rand(4, 3, 8, 16, 16, device=dev) * 2 - 1
        s = i3d.new_stats()
        t = timed(lambda: s.update(v))
        rows.append(("I3D stand-in features (8 frames, 224x224)", "4 clips", t, 4 / t, "clips/s"))
    for preset, shape in (("tiny", (3, 16, 16)), ("tiny_video", (3, 6, 16, 16))):
        cfg = load_config(preset)
        model = RIN(cfg.model).to(dev).eval()
        labels = torch.arange(args.samples, device=dev) % 10 if cfg.model.num_classes else None
        cond = torch.zeros(args.samples, 3, 2, 16, 16, device=dev) if cfg.model.is_video else None
        with torch.no_grad():
            t = timed(lambda: sample(model, (args.samples, *shape), cfg.diffusion, labels=labels, cond=cond,
                                     steps=args.steps, sampler="ddim"))
        rows.append((f"{preset} sampling, DDIM {args.steps} steps", f"{args.samples} samples", t,
                     args.samples / t, "samples/s"))
    rng = np.random.default_rng(0)
    f = rng.normal(size=(3000, 2048))
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    t0 = time.perf_counter()
    ref = FrechetReference(mu, sigma)
    t_ref = time.perf_counter() - t0
    t = timed(lambda: ref.distance(mu + 0.1, sigma))
    rows.append(("Fréchet distance 2048-d: reference square root (once)", "1", t_ref, 1 / t_ref, "per s"))
    rows.append(("Fréchet distance 2048-d: each snapshot", "1", t, 1 / t, "per s"))
    print(f"device: {dev}, torch threads: {torch.get_num_threads()}\n")
    print("| step | batch | seconds | rate |\n|---|---|---|---|")
    for name, batch, sec, rate, unit in rows:
        print(f"| {name} | {batch} | {sec:.2f} | {rate:.2f} {unit} |")


if __name__ == "__main__":
    main()
