"""Full training states (DESIGN.md): DeepSpeed's checkpoint plus the trainer's own files, marked
COMPLETE only after every rank has written and a barrier; resume takes the newest complete one.

    STATE/step-N/step-N/...          DeepSpeed (model, ZeRO optimizer partitions, LR schedule)
    STATE/step-N/ema.safetensors     full fp32 EMA (rank 0)
    STATE/step-N/trainer.json        step, images seen, world size, wall time, precision, optimizer groups (rank 0)
    STATE/step-N/rank-R.pt           {"rng": torch/CUDA/numpy/python RNG states of rank R,
                                      "loader": its data position (ShardLoader.state_dict, as JSON)}
                                     (loadable with weights_only=True)
    STATE/step-N/COMPLETE
    STATE/step-N/universal/step-N/   DeepSpeed universal checkpoint, made when another world size resumes

STATE is the local POSIX folder all ranks share (train.state_dir, default RUN/states). When RUN
is a bucket the finished folder is uploaded to RUN/states/step-N and marked there.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from . import rundir, storage
from .config import ConfigError


def local_state_root(cfg) -> str:
    tc = cfg.train
    if tc.state_dir:
        if not storage.is_local(tc.state_dir):
            raise ConfigError(f"train.state_dir={tc.state_dir!r} must be a POSIX path shared by all ranks "
                              f"(DeepSpeed writes there); states are uploaded to train.run_dir afterwards")
        return storage.local_path(tc.state_dir)
    if storage.is_local(tc.run_dir):
        return os.path.join(storage.local_path(tc.run_dir), "states")
    raise ConfigError(f"train.run_dir={tc.run_dir!r} is a bucket: set train.state_dir to a POSIX folder shared "
                      f"by all ranks (e.g. a cluster filesystem) where DeepSpeed writes states before upload")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict:
    st = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # this rank's GPU only: a node whose ranks each see one GPU (CUDA_VISIBLE_DEVICES per
        # task) could not restore the states of all eight
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])],
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state(s["cuda"][0])  # this rank's GPU (no GPU run saved another form)
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    py = json.loads(s["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_state(engine, cfg, step: int, ema_full: dict, loader_state: dict, meta: dict) -> str:
    """Collective: every rank calls it. `ema_full` is EMA.full_state(), gathered by the caller
    (rank 0 writes it). Returns the RUN/states/step-N URL once marked COMPLETE."""
    run, root = cfg.train.run_dir, local_state_root(cfg)
    tag = rundir.step_name(step)
    folder = os.path.join(root, tag)
    rank = _rank()
    if rank == 0 and os.path.exists(os.path.join(folder, rundir.COMPLETE)):
        os.remove(os.path.join(folder, rundir.COMPLETE))  # re-saving the same step: invalidate first
    _barrier()
    engine.save_checkpoint(folder, tag=tag, save_latest=False)
    torch.save({"rng": rng_state(), "loader": json.dumps(loader_state)}, os.path.join(folder, f"rank-{rank}.pt"))
    if rank == 0:
        from safetensors.torch import save_file

        save_file(ema_full, os.path.join(folder, "ema.safetensors"))
        world = dist.get_world_size() if dist.is_initialized() else 1
        with open(os.path.join(folder, "trainer.json"), "w") as f:
            json.dump({"step": step, "world_size": world, **meta}, f)
    _barrier()  # every rank has written its part
    url = storage.join(run, "states", tag)
    if rank == 0:
        mirrored = not _same_place(root, run)
        if mirrored:  # states live elsewhere: copy the finished folder to RUN/states, then mark both
            if storage.is_local(run):
                shutil.copytree(folder, storage.local_path(url), dirs_exist_ok=True)
            else:
                storage.put_dir(folder, url)
            rundir.mark_complete(folder, {"step": step})
        rundir.mark_complete(url, {"step": step})
        rundir.prune(run, "states", cfg.train.keep_last, cfg.train.milestone_every)
        if mirrored:
            keep = {s for s, _ in rundir.list_complete(run, "states")}
            for name in os.listdir(root):
                m = rundir.STEP_RE.search(name)
                if m and int(m.group(1)) not in keep and int(m.group(1)) < step:
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    _barrier()
    return url


def _same_place(root: str, run: str) -> bool:
    return storage.is_local(run) and os.path.abspath(root) == os.path.abspath(
        os.path.join(storage.local_path(run), "states"))


class Resume(NamedTuple):
    """The newest complete state: its step and the local folder holding it."""
    step: int
    folder: str


def find_resume(cfg) -> Resume | None:
    """The newest complete state, fetched locally if needed; None for a fresh run. Rank 0 decides
    and every rank gets the same answer (collective)."""
    found = None
    if _rank() == 0:
        newest = rundir.newest_complete(cfg.train.run_dir, "states")
        if newest is not None:
            step, url = newest
            folder = os.path.join(local_state_root(cfg), rundir.step_name(step))
            if not _usable(folder):
                _fetch(url, folder)
            found = Resume(step, folder)
    box = [found]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _usable(folder: str) -> bool:
    """A local state folder can be resumed from: marked, and holding what the mark promises."""
    return all(os.path.exists(os.path.join(folder, n)) for n in (rundir.COMPLETE, "trainer.json", "rank-0.pt"))


def _fetch(url: str, folder: str) -> None:
    """Copy a complete state from the bucket into `folder`: into a temporary folder first, checked,
    then renamed, so a kill mid-copy never leaves a folder that looks complete (the marker may
    arrive before the files it vouches for)."""
    tmp = folder.rstrip("/") + ".fetching"
    shutil.rmtree(tmp, ignore_errors=True)
    fs, path = storage.fs_path(url)
    storage.retry(lambda: fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True), f"fetching {url}")
    if not _usable(tmp):
        raise RuntimeError(f"{url} is marked COMPLETE but lacks trainer.json or rank-0.pt: delete it and re-run")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def saved_meta(folder: str) -> dict:
    """trainer.json of a state: step, images seen, world size, precision, wall time, optimizer groups."""
    with open(os.path.join(folder, "trainer.json")) as f:
        return json.load(f)


def check_state_fits(folder: str, model: torch.nn.Module) -> None:
    """ConfigError in one line when the state in `folder` holds another model shape than `model`
    (a re-run after the preset or a model.* override changed), instead of DeepSpeed's traceback
    from deep inside its load. Read from the state's EMA file: names and shapes, no tensor data."""
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "ema.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    now = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if saved == now:
        return
    diff = [f"{k} missing" for k in now if k not in saved][:2] + [f"{k} not in the config's model" for k in saved
                                                                  if k not in now][:2]
    diff += [f"{k} {list(saved[k])} saved, {list(now[k])} now" for k in now if k in saved and saved[k] != now[k]][:2]
    raise ConfigError(f"the run's newest state {folder} holds a model of another shape than this config's "
                      f"({'; '.join(diff)}): resume with the model.* settings it was trained with (the run's "
                      "config.yaml, or a config-*.yaml beside it), or start a new run with another train.run_dir")


def saved_world_size(folder: str) -> int:
    return saved_meta(folder)["world_size"]


def universal_for(folder: str, zero_stage: int) -> str:
    """The ZeRO state in `folder` as a DeepSpeed universal checkpoint (STATE/step-N/universal/step-N),
    converted once by rank 0 with DeepSpeed's own converter; collective. ZeRO partitions are tied to
    the world size that wrote them; the universal form is per parameter, so any world size loads
    weights, optimizer moments and step counts from it."""
    tag = os.path.basename(folder.rstrip("/"))
    out = os.path.join(folder, "universal", tag)
    if _rank() == 0 and not os.path.exists(os.path.join(out, rundir.COMPLETE)):
        shutil.rmtree(out, ignore_errors=True)  # a conversion killed half-way starts over
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               os.path.join(folder, tag), "--output_folder", out, "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        if zero_stage < 3:
            cmd.append("--inject_missing_state")  # the Megatron-only info DeepSpeed asks of ZeRO-1/2 states
        print(f"[train] converting {folder} (ZeRO-{zero_stage}) to a universal checkpoint for the new world size",
              flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"DeepSpeed could not convert {folder} to a universal checkpoint "
                               f"(resume with {saved_world_size(folder)} ranks instead): {proc.stderr.strip()[-1500:]}")
        rundir.mark_complete(out, {"from": folder})
    _barrier()
    return out


class LoadedState(NamedTuple):
    """What load_state gives back besides what it loads into the engine and the EMA."""
    meta: dict  # trainer.json: step, images_seen, world_size, wall_time
    rng: dict | None  # this rank's RNG states; None when the world size changed
    loader: dict  # the data loader's position (ShardLoader.state_dict)


GROUP_OWN = ("weight_decay", "adapt", "name")  # param-group settings that differ between groups


def load_state(engine, folder: str, ema, universal: str = "") -> LoadedState:
    """Loads weights, optimizer, LR schedule into the engine and the EMA; returns the trainer's
    meta, this rank's RNG state and the data-loader state.

    Another world size (same global batch) loads from `universal` (see universal_for; the engine
    must have been built with load_universal) or, for ZeRO-0, from the state as it is. Each rank's
    RNG then starts anew and the data loader re-derives its order from rank 0's position."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "trainer.json")) as f:
        meta = json.load(f)
    tag = os.path.basename(folder.rstrip("/"))
    rank = _rank()
    world = dist.get_world_size() if dist.is_initialized() else 1
    same = meta["world_size"] == world
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    own = [{k: g[k] for k in GROUP_OWN if k in g} for g in base.param_groups]
    path, _ = engine.load_checkpoint(os.path.dirname(universal) if universal else folder, tag=tag,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the state in {universal or folder}")
    if universal:
        # ZeRO-3's universal load copies param group 0's settings into every group (its weight
        # decay, its LAMB adaptation flag): give each group its own back. And it gives every
        # sub-group one shared 'step' tensor, which optimizers increment in place (by the number of
        # sub-groups per step): give each its own.
        for g, settings in zip(base.param_groups, own):
            g.update(settings)
        for st in base.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
    ema.load_full_state(load_file(os.path.join(folder, "ema.safetensors")))
    mine = os.path.join(folder, f"rank-{rank}.pt")
    extra = torch.load(mine if same else os.path.join(folder, "rank-0.pt"), weights_only=True)
    return LoadedState(meta, extra["rng"] if same else None, json.loads(extra["loader"]))
