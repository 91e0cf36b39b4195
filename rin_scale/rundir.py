"""The run directory (DESIGN.md): states, snapshots, COMPLETE markers, retention, ledgers.

A run is one fsspec URL (a local path, file://, gs://, s3://, memory://). A directory without
its COMPLETE marker does not exist for readers; the marker is written last.
"""
from __future__ import annotations

import re
import time
from typing import Optional

from .storage import exists, fs_path, join, read_bytes, read_json, write_bytes, write_json

COMPLETE = "COMPLETE"
STEP_RE = re.compile(r"step-(\d{9})$")


def step_name(step: int) -> str:
    return f"step-{step:09d}"


def _step_dirs(run: str, kind: str):
    """(filesystem, [(step, path)]) of the step-N directories under RUN/kind, complete or not."""
    fs, root = fs_path(join(run, kind))
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return fs, []
    found = [(STEP_RE.search(e.rstrip("/")), e) for e in entries]
    return fs, [(int(m.group(1)), e) for m, e in found if m]


def list_complete(run: str, kind: str) -> list[tuple[int, str]]:
    """[(step, url)] of complete `kind` directories ("states" or "snapshots"), oldest first."""
    fs, dirs = _step_dirs(run, kind)
    out = []
    for step, path in dirs:
        try:
            if fs.exists(join(path, COMPLETE)):
                out.append((step, join(run, kind, step_name(step))))
        except FileNotFoundError:  # deleted by retention while we looked
            continue
    fs.invalidate_cache()
    return sorted(out)


def newest_complete(run: str, kind: str) -> Optional[tuple[int, str]]:
    found = list_complete(run, kind)
    return found[-1] if found else None


def mark_complete(url: str, info: Optional[dict] = None) -> None:
    write_json(join(url, COMPLETE), {"time": time.time(), **(info or {})})


def _delete(run: str, kind: str, doomed) -> list[int]:
    """Delete the step directories for which doomed(step) is true; returns their steps. The COMPLETE
    marker goes first, so a concurrent reader never sees a half-deleted directory as complete."""
    fs, dirs = _step_dirs(run, kind)
    deleted = []
    for step, path in dirs:
        if not doomed(step):
            continue
        try:
            if fs.exists(join(path, COMPLETE)):
                fs.rm(join(path, COMPLETE))
            fs.rm(path, recursive=True)
            deleted.append(step)
        except FileNotFoundError:  # another reader or writer got there first
            pass
    fs.invalidate_cache()
    return sorted(deleted)


def prune(run: str, kind: str, keep_last: int, milestone_every: int = 0) -> list[int]:
    """Delete all but the newest `keep_last` complete dirs and the milestones; returns deleted steps.
    Incomplete directories older than the newest complete one are leftovers of killed writers and
    go too."""
    complete = [s for s, _ in list_complete(run, kind)]
    keep = set(complete[-keep_last:]) | {s for s in complete if milestone_every and s % milestone_every == 0}
    newest = complete[-1] if complete else -1
    return _delete(run, kind, lambda s: s not in keep and (s in complete or s < newest))


def discard_after(run: str, kind: str, step: int) -> list[int]:
    """Delete the `kind` directories past `step`. A resumed run calls it: what a killed job wrote
    after the state it resumes from belongs to a trajectory the run will not take."""
    return _delete(run, kind, lambda s: s > step)


# --------------------------------------------------------------------------------------------
# Snapshots: EMA weights (safetensors), model + diffusion config (JSON), meta (JSON), COMPLETE


def write_snapshot(run: str, step: int, ema_state: dict, cfg, meta: dict) -> str:
    """Write RUN/snapshots/step-N; `cfg` is the full Config; returns the snapshot URL."""
    from safetensors.torch import save as st_save

    from .config import to_dict

    url = join(run, "snapshots", step_name(step))
    if exists(join(url, COMPLETE)):
        return url
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in ema_state.items()}
    write_bytes(join(url, "ema.safetensors"), st_save(tensors, metadata={"step": str(step)}))
    d = to_dict(cfg)
    write_json(join(url, "model.json"), {"model": d["model"], "diffusion": d["diffusion"], "name": cfg.name})
    write_json(join(url, "meta.json"), {"step": step, **meta})
    mark_complete(url)
    return url


class SnapshotError(RuntimeError):
    """A snapshot that cannot be read: missing marker, deleted, or corrupt weights."""


def load_snapshot_model(url: str, device="cpu"):
    """(model, diffusion_cfg, meta) from a complete snapshot, without DeepSpeed."""
    from safetensors.torch import load as st_load

    from .config import diffusion_config_from_dict, model_config_from_dict
    from .model import RIN

    try:
        if not exists(join(url, COMPLETE)):
            raise SnapshotError(f"{url} has no COMPLETE marker: it is being written or was abandoned")
        cfgs = read_json(join(url, "model.json"))
        meta = read_json(join(url, "meta.json"))
        raw = read_bytes(join(url, "ema.safetensors"))
    except FileNotFoundError as e:
        raise SnapshotError(f"{url} disappeared while reading it (deleted by retention?): {e}") from None
    try:
        state = st_load(raw)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise SnapshotError(f"{url}/ema.safetensors is corrupt: {e}") from None
    model = RIN(model_config_from_dict(cfgs["model"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SnapshotError(f"{url}: weights do not match the model config "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    return model, diffusion_config_from_dict(cfgs["diffusion"]), meta


def load_run_config(run: str, overrides=()):
    """The run's resolved RUN/config.yaml (as the trainer wrote it), then overrides, validated."""
    from .config import Config, apply_overrides, load_yaml_into, validate

    url = join(run, "config.yaml")
    if not exists(url):
        raise FileNotFoundError(f"{url} does not exist: is {run} a run directory the trainer has started?")
    cfg = Config()
    load_yaml_into(cfg, url)
    apply_overrides(cfg, list(overrides))
    return validate(cfg)
