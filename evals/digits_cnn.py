"""Domain metrics for small labelled image sets (the demo's digits), with no pretrained weights.

A randomly initialised InceptionV3 (the demo's FID stand-in) moves with sample quality but says
little about whether samples look like the data. Here a small CNN is trained on the real training
images themselves (data.shards, with their class labels) and its penultimate features give a
domain FID:

    domain_fid        Frechet distance between the CNN features of the samples and of the real
                      training images (all of data.shards, up to MAX_IMAGES)
    floor             the same distance for real held-out images (eval.classifier_data): what a
                      generator whose samples were as good as new real data would get; computed
                      once per reference, with that many images
    laplacian_ratio   mean |Laplacian| of the samples / of the real held-out images: 1 = as smooth
                      as the data; above 1 = pixel noise or blotches, below 1 = blur

The CNN trains in seconds on a CPU and is deterministic (fixed seed, one thread, torch's
deterministic algorithms); its weights (a plain state dict, loaded with weights_only=True) and the
reference statistics are cached under eval.cache_dir, keyed by the data's fingerprint (the shards
and their manifest, as evals.reference keys the FID statistics), so every snapshot of every run on
the same data is scored by the same network.

    python -m evals.digits_cnn TRAIN_SHARDS HELDOUT_SHARDS [--cache-dir DIR]   # the floor, once
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rin_scale import storage
from rin_scale.media import to_uint8

from .frechet import FeatureStats, FrechetReference

ARCH = "digits-cnn-v1"  # bump when the network, its training or the features change
SEED = 0
EPOCHS = 20
BATCH = 64
MAX_IMAGES = 20_000  # a CNN for a digits-sized set; larger data is subsampled (the first N)
_CACHE: dict = {}


class DigitsCNN(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-fc128-fc(K); features = the 128 after ReLU.

    Any square image size divisible by 4; images in [-1, 1], C channels."""

    num_features = 128

    def __init__(self, channels: int, image_size: int, num_classes: int):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"the digits CNN needs an image size divisible by 4, got {image_size}")
        self.convs = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2))
        self.fc = nn.Linear(64 * (image_size // 4) ** 2, self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)
        self.drop = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


# --------------------------------------------------------------------------------------------
# Pixels: what both the features and the Laplacian see


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Samples as an image file holds them: clamped, rounded to uint8, back to [-1, 1]."""
    return to_uint8(x).float().div_(127.5).sub_(1.0)


def laplacian_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean |4-neighbour Laplacian| per image (B,), on the channel mean, interior pixels only
    (no padding: borders would add edges that are not in the image)."""
    g = x.float().mean(1, keepdim=True)
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(g, k.to(g.device)).abs().flatten(1).mean(1)


def load_images(url: str, model_cfg, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N,C,H,W) in [-1, 1], labels (N,)) of every decodable sample at url (the first `limit`)."""
    from .classifier import read_samples

    x, y = read_samples(url, model_cfg, limit)
    if len(x) < 2:
        raise ValueError(f"{url!r} gave {len(x)} readable images: the digits CNN needs real labelled images")
    return x, y


# --------------------------------------------------------------------------------------------
# Training, deterministic


@contextlib.contextmanager
def _deterministic():
    """One thread and torch's deterministic kernels while the CNN trains; the caller's settings after."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def _shift(x: torch.Tensor, gen: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Random translations by up to `pad` pixels (the background, -1, fills in)."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=gen)
    return torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def train_cnn(x: torch.Tensor, y: torch.Tensor, seed: int = SEED, epochs: int = EPOCHS) -> DigitsCNN:
    """A DigitsCNN fitted on (x, y); the same data and seed give bit-identical weights."""
    num_classes = int(y.max()) + 1
    with _deterministic():
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initialisation and dropout
            net = DigitsCNN(x.shape[1], x.shape[-1], num_classes)
            opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
            steps = epochs * max(len(x) // BATCH, 1)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
            net.train()
            step = 0
            while step < steps:
                order = torch.randperm(len(x), generator=gen)
                for i in range(0, len(x) - BATCH + 1 if len(x) >= BATCH else 1, BATCH):
                    idx = order[i:i + BATCH]
                    loss = F.cross_entropy(net(_shift(x[idx], gen)), y[idx], label_smoothing=0.1)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    if step == steps:
                        break
    return net.eval()


@torch.no_grad()
def features(net: DigitsCNN, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Penultimate features (N, 128) of images in [-1, 1] (quantized to uint8 first), float64."""
    dev = next(net.parameters()).device
    out = [net.features(quantize(x[i:i + batch]).to(dev)).double().cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


@torch.no_grad()
def accuracy(net: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    dev = next(net.parameters()).device
    pred = torch.cat([net(quantize(x[i:i + 500]).to(dev)).argmax(1).cpu() for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


# --------------------------------------------------------------------------------------------
# The cached network and reference


class DomainReference(NamedTuple):
    """The CNN, the real training images' feature statistics and the real-vs-real floor."""

    net: DigitsCNN
    id: str  # names the network: architecture and the key of the data it was trained on
    ref: FrechetReference
    n: int  # real training images in the statistics
    floor: float  # domain FID of the real held-out images
    floor_n: int  # held-out images behind the floor
    real_laplacian: float  # mean |Laplacian| of the real held-out images
    heldout_accuracy: float  # the CNN's own accuracy on the held-out images
    url: str  # where the statistics are cached

    def distance(self, stats: FeatureStats) -> float:
        return self.ref.distance(*stats.mean_cov(), stats.rows())

    def new_stats(self) -> FeatureStats:
        return FeatureStats(self.net.num_features)


def _fingerprint(url: str) -> str:
    from .reference import dataset_fingerprint

    return dataset_fingerprint(url)


def _key(*parts) -> str:
    return hashlib.sha256("\n".join(str(p) for p in parts).encode()).hexdigest()[:20]


def _cache_base(cache_dir: str) -> str:
    return os.path.expanduser(cache_dir) if storage.is_local(cache_dir) else cache_dir


def get_cnn(train_url: str, model_cfg, cache_dir: str, progress: bool = True) -> tuple[DigitsCNN, str]:
    """(the CNN trained on train_url, its id): loaded from the cache, or trained and cached."""
    key = _key(ARCH, _fingerprint(train_url), model_cfg.image_size, model_cfg.channels, SEED, EPOCHS, MAX_IMAGES)
    url = storage.join(_cache_base(cache_dir), "digits_cnn", f"{ARCH}-{key}.pt")
    fs, path = storage.fs_path(url)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raw = None
    if raw is not None:
        try:
            saved = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            net = DigitsCNN(model_cfg.channels, model_cfg.image_size, int(saved["num_classes"]))
            net.load_state_dict(saved["state_dict"])
            return net.eval(), f"{ARCH}-{key}"
        except Exception as e:
            raise ValueError(f"cached digits CNN {url} is unreadable ({type(e).__name__}: {e}): delete it to "
                             f"retrain") from None
    x, y = load_images(train_url, model_cfg, MAX_IMAGES)
    labelled = y >= 0
    x, y = x[labelled], y[labelled]
    if len(torch.unique(y)) < 2:
        raise ValueError(f"data.shards={train_url!r} has {len(y)} labelled images in {len(torch.unique(y))} "
                         f"class(es): the digits CNN trains on the labelled training data")
    t0 = time.time()
    net = train_cnn(x, y)
    if progress:
        print(f"[evals] trained the digits CNN on {len(x)} images of {train_url} in {time.time() - t0:.0f} s "
              f"-> {url}", file=sys.stderr, flush=True)
    buf = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "num_classes": torch.tensor(int(y.max()) + 1)}, buf)
    storage.write_bytes(url, buf.getvalue())
    return net, f"{ARCH}-{key}"


def domain_reference(train_url: str, heldout_url: str, model_cfg, cache_dir: str,
                     progress: bool = True) -> DomainReference:
    """The CNN, the statistics of train_url and the held-out floor, cached (once per process too)."""
    memo = (train_url, heldout_url, model_cfg.image_size, model_cfg.channels, cache_dir)
    if memo in _CACHE:
        return _CACHE[memo]
    from safetensors.numpy import load, save

    net, net_id = get_cnn(train_url, model_cfg, cache_dir, progress)
    key = _key(net_id, _fingerprint(train_url), _fingerprint(heldout_url))
    url = storage.join(_cache_base(cache_dir), "digits_cnn", f"reference-{key}.safetensors")
    fs, path = storage.fs_path(url)
    try:
        t = load(fs.cat_file(path))
    except FileNotFoundError:
        t = None
    if t is None:
        xt, _ = load_images(train_url, model_cfg, MAX_IMAGES)
        xh, yh = load_images(heldout_url, model_cfg)
        ft, fh = features(net, xt), features(net, xh)
        mu, sigma = _mean_cov(ft)
        fr = FrechetReference(mu, sigma, rows=ft.numpy() if len(ft) < ft.shape[1] else None)
        hm, hs = _mean_cov(fh)
        floor = fr.distance(hm, hs, fh.numpy() if len(fh) < fh.shape[1] else None)
        t = {"mu": mu, "sigma": sigma, "n": np.array([len(ft)]), "floor": np.array([floor]),
             "floor_n": np.array([len(fh)]),
             "real_laplacian": np.array([float(laplacian_energy(quantize(xh)).mean())]),
             "heldout_accuracy": np.array([accuracy(net, xh[yh >= 0], yh[yh >= 0]) if (yh >= 0).any() else np.nan])}
        if len(ft) < ft.shape[1]:
            t["rows"] = ft.numpy()
        storage.write_bytes(url, save(t, metadata={"data": train_url, "heldout": heldout_url, "extractor": net_id}))
        if progress:
            print(f"[evals] domain reference: {len(ft)} training images, floor (real held-out, {len(fh)} images) "
                  f"{floor:.3f} -> {url}", file=sys.stderr, flush=True)
    ref = FrechetReference(t["mu"], t["sigma"], rows=t.get("rows"))
    out = DomainReference(net, net_id, ref, int(t["n"][0]), float(t["floor"][0]), int(t["floor_n"][0]),
                          float(t["real_laplacian"][0]), float(t["heldout_accuracy"][0]), url)
    _CACHE[memo] = out
    return out


def _mean_cov(f: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    s = FeatureStats(f.shape[1])
    s.update(f)
    return s.mean_cov()


class DomainScore:
    """Accumulates one set of samples: their CNN features and Laplacian energy."""

    def __init__(self, dom: DomainReference):
        self.dom = dom
        self.stats = dom.new_stats()
        self.lap = 0.0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = quantize(x.detach().float().cpu())
        self.stats.update(features(self.dom.net, x))
        self.lap += float(laplacian_energy(x).sum())

    def state(self) -> dict:
        return {"stats": self.stats.state(), "lap": self.lap}

    def merge(self, state: dict) -> None:
        self.stats.merge(state["stats"])
        self.lap += state["lap"]

    def result(self) -> dict:
        fid = self.dom.distance(self.stats)
        lap = self.lap / max(self.stats.n, 1)
        return {"domain_fid": fid, "domain_fid_floor": self.dom.floor, "laplacian_ratio": lap / self.dom.real_laplacian,
                "sample_laplacian": lap}


def main(argv=None) -> int:
    import argparse

    from rin_scale.config import ModelConfig

    p = argparse.ArgumentParser(prog="python -m evals.digits_cnn", description=__doc__.split("\n\n")[0])
    p.add_argument("train", help="the real training shards (what the CNN and the reference are made of)")
    p.add_argument("heldout", help="real held-out shards (the floor)")
    p.add_argument("--cache-dir", default="~/.cache/rin_scale")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=3)
    args = p.parse_args(argv)
    m = ModelConfig(image_size=args.image_size, channels=args.channels)
    try:
        dom = domain_reference(args.train, args.heldout, m, args.cache_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"extractor": dom.id, "reference_samples": dom.n, "floor": dom.floor, "floor_samples": dom.floor_n,
                      "real_laplacian": dom.real_laplacian, "cnn_heldout_accuracy": dom.heldout_accuracy,
                      "reference": dom.url}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
