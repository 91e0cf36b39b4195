"""Reference statistics: float64 mean and covariance of the real data's features, cached.

    python -m evals.reference [PRESET] [file.yaml] [data.shards=URL] [eval.cache_dir=URL] [...]

The cache key hashes the shard manifest (or the shard list and sizes), the extractor id (which
includes a digest of its weights file), the image size, channels and frames, and the sample limit,
so each dataset is featurised once per extractor. The cache may be any fsspec URL.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm

from rin_scale import storage
from rin_scale.config import mask_secrets


class Reference(NamedTuple):
    """Feature statistics of real data, and the URL they are stored at."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    url: str
    rows: Optional[np.ndarray]  # the features themselves, kept while fewer than the dimensions


def dataset_fingerprint(url: str) -> str:
    """What identifies a shard set: the shards selected (a brace pattern may pick a subset of a
    folder) with their sample counts, and the manifest they come from."""
    from rin_scale.data import list_shards

    shards, counts, man = list_shards(url)
    selected = [[s.rsplit("/", 1)[-1], c] for s, c in zip(shards, counts)]
    return json.dumps({"shards": selected, "manifest": man}, sort_keys=True)


def cache_key(url: str, extractor_id: str, model_cfg, limit: int = 0) -> str:
    parts = [dataset_fingerprint(url), extractor_id, f"size={model_cfg.image_size}", f"ch={model_cfg.channels}",
             f"frames={model_cfg.frames}", f"limit={limit}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _cache_url(cache_dir: str, key: str, metric: str) -> str:
    base = os.path.expanduser(cache_dir) if storage.is_local(cache_dir) else cache_dir
    return storage.join(base, "reference", f"{metric}-{key}.safetensors")


def save_stats(ref: Reference, meta: dict) -> None:
    """Statistics as safetensors at ref.url; the feature rows too when kept (cheap distances)."""
    from safetensors.numpy import save

    tensors = {"mu": np.ascontiguousarray(ref.mu, np.float64), "sigma": np.ascontiguousarray(ref.sigma, np.float64),
               "n": np.array([ref.n], np.int64)}
    if ref.rows is not None:
        tensors["rows"] = np.ascontiguousarray(ref.rows, np.float64)
    storage.write_bytes(ref.url, save(tensors, metadata={k: str(v) for k, v in meta.items()}))


def load_stats(url: str) -> Optional[Reference]:
    """The statistics stored at url, or None when there are none."""
    from safetensors.numpy import load

    fs, path = storage.fs_path(url)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        t = load(raw)
        return Reference(t["mu"], t["sigma"], int(t["n"][0]), url, t.get("rows"))
    except Exception as e:
        raise ValueError(f"reference statistics {url} are unreadable ({e}): delete the file to recompute") from None


def compute_stats(url: str, extractor, model_cfg, limit: int = 0, batch: int = 50, progress: bool = True):
    """The extractor's feature statistics (SampleStats) over the shards at `url` (all, or the first `limit`)."""
    from rin_scale.data import iter_samples

    stats = extractor.new_stats()
    buf = []
    bar = tqdm(total=limit or None, desc=f"reference {extractor.metric}", unit="sample", disable=not progress,
               file=sys.stderr)
    n = 0
    for x, _, _ in iter_samples(url, model_cfg):
        buf.append(x)
        n += 1
        if len(buf) == batch or n == limit:
            stats.update(torch.stack(buf))
            bar.update(len(buf))
            buf = []
        if n == limit:
            break
    if buf:
        stats.update(torch.stack(buf))
        bar.update(len(buf))
    bar.close()
    if stats.n < 2:
        raise ValueError(f"{url} gave {stats.n} readable samples: the reference needs at least 2")
    return stats


def reference_stats(cfg, extractor, progress: bool = True) -> Reference:
    """eval.reference if set, else the cached statistics of data.shards (computed and cached once)."""
    e = cfg.eval
    if e.reference:
        found = load_stats(e.reference)
        if found is None:
            raise FileNotFoundError(f"eval.reference={e.reference!r} does not exist: compute it with "
                                    f"python -m evals.reference, or leave eval.reference empty")
        return found
    if not cfg.data.shards:
        raise ValueError("no reference statistics: set data.shards (the real data) or eval.reference=URL")
    key = cache_key(cfg.data.shards, extractor.id, cfg.model, e.reference_samples)
    url = _cache_url(e.cache_dir, key, extractor.metric)
    found = load_stats(url)
    if found is not None:
        return found
    print(f"[evals] computing reference statistics of {mask_secrets(cfg.data.shards)} with {extractor.id} -> {url}",
          file=sys.stderr, flush=True)
    stats = compute_stats(cfg.data.shards, extractor, cfg.model, e.reference_samples, e.batch, progress)
    ref = Reference(*stats.mean_cov(), stats.n, url, stats.rows())
    save_stats(ref, {"data": cfg.data.shards, "extractor": extractor.id})
    return ref


def main(argv=None) -> int:
    import argparse

    from rin_scale.config import ConfigError, load_config

    from .extractors import Extractor, ExtractorError, metric_for

    p = argparse.ArgumentParser(prog="python -m evals.reference", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="*", help="PRESET, YAML files and section.key=value overrides")
    args = p.parse_args(argv)
    try:
        cfg = load_config(None, args.config)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        extractor = Extractor(metric_for(cfg), cfg.eval, device)
        ref = reference_stats(cfg, extractor)
    except (ConfigError, ExtractorError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"reference statistics: {ref.n} samples, {ref.mu.shape[0]} features, {extractor.id} -> {ref.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
