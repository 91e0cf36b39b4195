"""Helpers (no tests) for the eval tests: small real shards of the embedded data, and run directories with
snapshots written by rundir.write_snapshot from freshly initialised RINs (no trainer needed)."""
from __future__ import annotations

import argparse
import os

import torch

from rin_scale import rundir, storage
from rin_scale.config import dump_yaml, load_config


def make_shards(out: str, dataset: str, n: int, frames: int = 16, shard_size: int = 1000) -> str:
    """The first n samples of an embedded dataset's held-out split, sharded by data_tools.shard."""
    from data_tools import embedded
    from data_tools.shard import build_items, make_shards as _make

    args = argparse.Namespace(embedded=dataset, split="heldout", resize=0, clip_frames=frames, kind="auto",
                              source=None)
    items, classes, kind = build_items(args)
    opts = {"kind": kind, "shard_size": shard_size, "shard_bytes": 0, "resize": 0, "format": None,
            "clip_frames": frames if dataset == "moving_digits" else 0, "frame_stride": 1,
            "source": f"embedded:{dataset}:heldout"}
    _make(items[:n], out, opts, embedded.CLASSES, "data", 1, progress=False)
    return out


def make_run(run: str, preset: str, overrides: list[str]):
    """RUN/config.yaml as the trainer writes it; returns (cfg, a fresh RIN)."""
    from rin_scale.model import RIN

    cfg = load_config(preset, [f"train.run_dir={run}"] + overrides)
    fs, path = storage.fs_path(run)
    fs.makedirs(path, exist_ok=True)
    with fs.open(storage.join(path, "config.yaml"), "w") as f:
        f.write(dump_yaml(cfg))
    torch.manual_seed(0)
    return cfg, RIN(cfg.model)


def snapshot(run: str, cfg, model, step: int) -> str:
    return rundir.write_snapshot(run, step, model.state_dict(), cfg, {"images_seen": step * cfg.train.global_batch,
                                                                      "wall_time": float(step)})


def ledger(run: str) -> list[dict]:
    return storage.read_jsonl(storage.join(run, "eval", "ledger.jsonl"))


def tb_scalars(logdir: str) -> dict:
    """{tag: [(step, value)]} read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    out = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    out["_images"] = acc.Tags()["images"]
    return out


def local_files(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
