"""The run directory (DESIGN.md): states, snapshots, COMPLETE markers, retention, ledgers.

A run is one fsspec URL (a local path, file://, gs://, s3://, memory://). A directory without
its COMPLETE marker does not exist for readers; the marker is written last.
"""
from __future__ import annotations

import json
import re
import time
from typing import Optional

from .storage import (append_jsonl, exists, fs_path, is_local, join, read_bytes, read_json, read_jsonl, retry,
                      write_bytes, write_json)

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


def prune(run: str, kind: str, keep_last: int, milestone_every: int = 0, keep=()) -> list[int]:
    """Delete all but the newest `keep_last` complete dirs, the milestones and the steps in `keep`;
    returns deleted steps. Incomplete directories older than the newest complete one are leftovers
    of killed writers and go too."""
    complete = [s for s, _ in list_complete(run, kind)]
    keep = set(keep) | set(complete[-keep_last:]) | {s for s in complete if milestone_every and s % milestone_every == 0}
    newest = complete[-1] if complete else -1
    return _delete(run, kind, lambda s: s not in keep and (s in complete or s < newest))


_budget_warned = False


def prune_snapshots(cfg) -> list[int]:
    """The trainer's retention of snapshots: train.keep_last and the milestones, plus the snapshots
    the eval plan still wants (RUN/eval/plan.json, written by the eval service: with eval.order=all
    every unscored one), up to eval.keep_unscored of them. Beyond that budget the oldest unscored
    ones go, each with a `skipped` ledger row and, once per process, a warning."""
    global _budget_warned
    t, budget = cfg.train, cfg.eval.keep_unscored
    run = t.run_dir
    wanted, over = [], []
    plan = _eval_plan(run) if budget else None
    if plan and plan.get("order") == "all":
        done = {int(r["step"]) for r in read_ledger(run) if r.get("metric") == plan.get("metric")}
        complete = [s for s, _ in list_complete(run, "snapshots")]
        wanted = [s for s in complete[:-t.keep_last] if s not in done
                  and not (t.milestone_every and s % t.milestone_every == 0)]
        cut = max(len(wanted) - budget, 0)
        over, wanted = wanted[:cut], wanted[cut:]
    for step in over:
        append_ledger(run, {"step": step, "metric": plan["metric"], "value": None, "status": "skipped",
                            "error": f"deleted unscored: eval.keep_unscored={budget} snapshots were already waiting "
                                     f"for the eval service", "time": time.time()}, "trainer")
    if over and not _budget_warned:
        _budget_warned = True
        print(f"[train] warning: the eval service is {len(wanted) + len(over)} snapshots behind; deleting the "
              f"oldest unscored ({', '.join(map(str, over))}) to stay within eval.keep_unscored={budget} (a ledger "
              f"row says so for each): raise eval.keep_unscored, or run more eval services or GPUs", flush=True)
    return prune(run, "snapshots", t.keep_last, t.milestone_every, keep=wanted)


def _eval_plan(run: str) -> Optional[dict]:
    try:
        return read_json(join(run, "eval", "plan.json"))
    except (FileNotFoundError, ValueError):  # no eval service has started on the run (or a torn write)
        return None


# --------------------------------------------------------------------------------------------
# The eval ledger: one row per scored snapshot and metric (the eval service's; the trainer adds
# `skipped` rows). A local run appends lines to RUN/eval/ledger.jsonl (O_APPEND: concurrent writers
# interleave whole lines). A bucket cannot append, and rewriting the whole file to add a row lets two
# writers drop each other's rows, so there each row is its own object, RUN/eval/ledger/STEP-METRIC-OWNER.json.


def ledger_jsonl_url(run: str) -> str:
    return join(run, "eval", "ledger.jsonl")


def append_ledger(run: str, row: dict, owner: str) -> None:
    if is_local(run):
        append_jsonl(ledger_jsonl_url(run), row)
    else:
        name = f"{step_name(row['step'])}-{row['metric']}-{owner}.json"
        write_json(join(run, "eval", "ledger", name), row)


def read_ledger(run: str, cache: Optional[dict] = None) -> list[dict]:
    """Every row, oldest step first. Row objects never change, so a `cache` dict kept by a
    long-running reader saves fetching them again."""
    cache = {} if cache is None else cache
    fs, root = fs_path(join(run, "eval", "ledger"))
    try:
        names = [p for p in fs.ls(root, detail=False, refresh=True) if p.endswith(".json")]
    except FileNotFoundError:
        names = []
    new = [p for p in names if p not in cache]
    if new:
        cache.update((p, json.loads(b)) for p, b in fs.cat(new, on_error="omit").items())
    rows = read_jsonl(ledger_jsonl_url(run)) + [cache[p] for p in names if p in cache]
    return sorted(rows, key=lambda r: (r.get("step", -1), r.get("time", 0)))


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
    if retry(lambda: exists(join(url, COMPLETE)), f"checking {url}"):
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
