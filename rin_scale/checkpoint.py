"""Full training states (DESIGN.md): DeepSpeed's checkpoint plus the trainer's own files, marked
COMPLETE only after every rank has written and a barrier; resume takes the newest complete one.

    STATE/step-N/step-N/...          DeepSpeed (model, ZeRO optimizer partitions, LR schedule)
    STATE/step-N/ema.safetensors     full fp32 EMA (rank 0)
    STATE/step-N/trainer.json        step, images seen, world size, wall time, precision, optimizer groups (rank 0)
    STATE/step-N/rank-R.pt           {"rng": torch/CUDA/numpy/python RNG states of rank R,
                                      "loader": its data position (ShardLoader.state_dict, as JSON)}
                                     (loadable with weights_only=True)
    STATE/step-N/COMPLETE            written last, by rank 0: {"files": {path: [bytes, crc32]}} of every
                                     file above, checked before a resume loads the state (verify)
    STATE/step-N/universal/step-N/   DeepSpeed universal checkpoint, made when another world size resumes

STATE is the local POSIX folder all ranks share (train.state_dir, default RUN/states), checked at
start-up (check_shared). When RUN is a bucket the finished folder is uploaded to RUN/states/step-N
and marked there.

A save is in two parts: the collective part (DeepSpeed's files and each rank's rank-R.pt, every rank
waits for it) and rank 0's finishing (ema.safetensors, trainer.json, checksums, the upload, the
COMPLETE markers, retention), which runs in a Background thread while training goes on: at scale
every rank would otherwise wait for rank 0's upload of gigabytes at bucket speed.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import uuid
import zlib
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from . import rundir, storage
from .config import ConfigError, mask_secrets

CHUNK = 8 << 20  # bytes read at a time when checksumming a state's files


class StateError(RuntimeError):
    """A state cannot be written or none can be resumed from; the message names the path and the fix."""


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


# --------------------------------------------------------------------------------------------
# Saving: the collective part, then rank 0's finishing in the background


class Background:
    """Rank 0's one background job (finishing a save, writing a snapshot): one in flight at a time,
    a new one waits for the previous. A job's failure is kept and raised, in one line, by the next
    check() or wait() on the training thread. A daemon thread: a job killed with its process leaves
    no COMPLETE marker, so the previous complete state stays the newest."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error = ""

    def submit(self, jobs: list[Callable[[], None]]) -> None:
        self.wait()

        def run():
            try:
                for job in jobs:
                    job()
            except StateError as e:  # already one line that names the fix
                self._error = mask_secrets(str(e))
            except Exception as e:  # noqa: BLE001 - reported on the training thread
                first = str(e).splitlines()[0] if str(e) else ""
                self._error = mask_secrets(f"a save's background work failed ({type(e).__name__}: {first[:300]}); "
                                           "the newest complete state is kept: fix the cause and re-run the same "
                                           "command to resume from it")

        self._thread = threading.Thread(target=run, name="rin-save-finisher", daemon=True)
        self._thread.start()

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        if self._error:
            raise StateError(self._error)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()


def _host() -> str:
    """This rank's node: SLURM's name for it when there is one (several may share a host name)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _tree(folder: str) -> dict[str, int]:
    """{path relative to folder: bytes} of the files a state holds (not COMPLETE, not universal/)."""
    out = {}
    for base, dirs, files in os.walk(folder):
        if base == folder:
            dirs[:] = [d for d in dirs if d != "universal"]
        for name in files:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, folder)
            if rel != rundir.COMPLETE:
                out[rel] = os.path.getsize(path)
    return out


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def manifest(folder: str) -> dict[str, list[int]]:
    """{file: [bytes, crc32]} of a finished state folder: what COMPLETE vouches for. CRC-32 detects
    truncation, bit rot and bad copies (not tampering) at about 0.5 s per GB on one core."""
    return {rel: [size, _crc32(os.path.join(folder, rel))] for rel, size in sorted(_tree(folder).items())}


def verify(folder: str) -> str:
    """"" when the local state folder holds what its COMPLETE marker vouches for; else the first
    problem, naming the file. States marked before checksums were recorded: their key files only."""
    try:
        with open(os.path.join(folder, rundir.COMPLETE)) as f:
            files = json.load(f).get("files")
    except FileNotFoundError:
        return f"{folder} has no {rundir.COMPLETE} marker"
    except (OSError, ValueError) as e:
        return f"{os.path.join(folder, rundir.COMPLETE)} is unreadable ({e})"
    if files is None:
        missing = [n for n in ("trainer.json", "rank-0.pt", "ema.safetensors")
                   if not os.path.exists(os.path.join(folder, n))]
        return f"{os.path.join(folder, missing[0])} is missing" if missing else ""
    for rel, (size, crc) in files.items():
        path = os.path.join(folder, rel)
        if not os.path.exists(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} is {os.path.getsize(path)} bytes, {size} when the state was saved"
        if _crc32(path) != crc:
            return f"{path} has other bytes than when the state was saved (CRC-32 differs)"
    return ""


def state_bytes(folder: str) -> int:
    return sum(_tree(folder).values()) if os.path.isdir(folder) else 0


def check_room(root: str, step: int) -> None:
    """Stop before a save that cannot fit (collective): a full disk surfaces from DeepSpeed's
    torch.save as `basic_ios::clear: iostream error`, and a rank whose write fails while others wait
    in DeepSpeed's barrier hangs the job. A state needs about what the newest one took."""
    done = [os.path.join(root, n) for n in os.listdir(root) if rundir.STEP_RE.search(n)]
    done = sorted(f for f in done if os.path.exists(os.path.join(f, rundir.COMPLETE)))
    need = state_bytes(done[-1]) if done else 0
    free = shutil.disk_usage(root).free
    short = torch.tensor([float(free < need)])
    if dist.is_initialized():
        dist.all_reduce(short, op=dist.ReduceOp.MAX)
    if short.item() > 0:
        where = f"{root} has {free / 2**20:.1f} MiB free" if free < need else "another rank's disk is short"
        raise StateError(f"no space left on the device for the state at step {step}: {where}, a state needs about "
                         f"{need / 2**20:.1f} MiB (the last one's size); the newest complete state is kept. Free "
                         "space there, lower train.keep_last, or point train.state_dir at a larger disk")


def _write_failed(e: BaseException, folder: str, root: str) -> BaseException:
    """The error to raise for a local write that failed: one line when the disk is full (checked
    here: DeepSpeed's torch.save does not say ENOSPC), after removing the partial folder."""
    shutil.rmtree(folder, ignore_errors=True)
    full = any(getattr(x, "errno", None) == errno.ENOSPC for x in storage._chain(e))
    try:
        full = full or shutil.disk_usage(root).free < CHUNK
    except OSError:
        pass
    if not full:
        return e
    return StateError(f"no space left on the device writing {folder} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else ''}); the partial folder is removed and the "
                      "newest complete state kept. Free space there, lower train.keep_last, or point "
                      "train.state_dir at a larger disk")


def _check_all_present(trees: list[dict], hosts: list[str], folder: str) -> None:
    """Every rank's files must be seen by rank 0, whose view is what gets marked and uploaded."""
    mine = trees[0]
    for rank, tree in enumerate(trees[1:], 1):
        lost = [rel for rel, size in tree.items() if mine.get(rel) != size]
        if lost:
            raise StateError(f"rank 0 ({hosts[0]}) does not see the files rank {rank} ({hosts[rank]}) wrote to "
                             f"{folder} (e.g. {lost[0]}): train.state_dir is not one folder shared by all ranks; "
                             "point it at a filesystem every node mounts")


def save_state(engine, cfg, step: int, ema_full: dict, loader_state: dict, meta: dict) -> Callable[[], None] | None:
    """Collective: every rank calls it, and each writes its part (DeepSpeed's files, its rank-R.pt).
    `ema_full` is EMA.full_state(), gathered by the caller. Returns, on rank 0, the job that
    finishes the state (rank 0's files, checksums, upload, COMPLETE, retention) to run in the
    Background; None on other ranks."""
    run, root = cfg.train.run_dir, local_state_root(cfg)
    tag = rundir.step_name(step)
    folder = os.path.join(root, tag)
    rank = _rank()
    check_room(root, step)
    if rank == 0:  # a folder of this step is left from a killed job (or a damaged state): start clean
        if os.path.exists(os.path.join(folder, rundir.COMPLETE)):
            os.remove(os.path.join(folder, rundir.COMPLETE))
        shutil.rmtree(folder, ignore_errors=True)
    _barrier()
    try:
        engine.save_checkpoint(folder, tag=tag, save_latest=False)
        torch.save({"rng": rng_state(), "loader": json.dumps(loader_state)}, os.path.join(folder, f"rank-{rank}.pt"))
    except (OSError, RuntimeError) as e:
        raise _write_failed(e, folder, root) from None
    _barrier()  # every rank has written its part
    trees, hosts = [_tree(folder)], [_host()]
    if dist.is_initialized() and dist.get_world_size() > 1:
        both = [None] * dist.get_world_size()
        dist.all_gather_object(both, (trees[0], hosts[0]))
        trees, hosts = [t for t, _ in both], [h for _, h in both]
    _check_all_present(trees, hosts, folder)
    if rank != 0:
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    trainer = {"step": step, "world_size": world, **meta}
    return lambda: _finish(cfg, step, folder, ema_full, trainer)


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) then a rename: a kill mid-write leaves only a temporary name, which the next save
    of this step removes with the folder (never inside a folder marked COMPLETE)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _finish(cfg, step: int, folder: str, ema_full: dict, trainer: dict) -> None:
    """Rank 0, in the background: its files, the checksums, the upload, COMPLETE, retention."""
    from safetensors.torch import save_file

    run, root = cfg.train.run_dir, os.path.dirname(folder)
    try:
        _write_atomic(os.path.join(folder, "ema.safetensors"), lambda p: save_file(ema_full, p))
        _write_atomic(os.path.join(folder, "trainer.json"), lambda p: open(p, "w").write(json.dumps(trainer)))
    except OSError as e:
        raise _write_failed(e, folder, root) from None
    files = {"files": manifest(folder), "step": step}
    url = storage.join(run, "states", rundir.step_name(step))
    mirrored = not _same_place(root, run)
    if mirrored:  # states live elsewhere: copy the finished folder to RUN/states, then mark both
        fs, path = storage.fs_path(storage.join(url, rundir.COMPLETE))
        if storage.retry(lambda: fs.exists(path), f"checking {url}"):  # re-saving a step: invalidate first
            storage.retry(lambda: fs.rm(path), f"invalidating {url}")
        if storage.is_local(run):
            shutil.copytree(folder, storage.local_path(url), dirs_exist_ok=True)
        else:
            storage.put_dir(folder, url)
        rundir.mark_complete(folder, files)
    rundir.mark_complete(url, files)
    storage.retry(lambda: rundir.prune(run, "states", cfg.train.keep_last, cfg.train.milestone_every),
                  f"pruning {storage.join(run, 'states')}")  # idempotent: an outage mid-way is retried whole
    if mirrored:
        keep = {s for s, _ in rundir.list_complete(run, "states")}
        for name in os.listdir(root):
            m = rundir.STEP_RE.search(name)
            if m and int(m.group(1)) not in keep and int(m.group(1)) < step:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def check_shared(cfg) -> None:
    """At start-up (collective): the state folder must be one folder every rank sees, since DeepSpeed's
    ranks write one state together and rank 0 marks and uploads it. Node-local scratch would give a
    state holding only rank 0's node's optimizer files, which no later resume can load."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    root, rank = local_state_root(cfg), _rank()
    box = [f".shared-check-{uuid.uuid4().hex}"]
    dist.broadcast_object_list(box, src=0)
    token = os.path.join(root, box[0])
    if rank == 0:
        storage.write_bytes(token, b"written by rank 0")
    _barrier()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (os.path.exists(token), _host(), root))
    if rank == 0:
        os.remove(token)
    blind = [(r, host, path) for r, (ok, host, path) in enumerate(seen) if not ok]
    if blind:
        r, host, path = blind[0]
        raise ConfigError(f"train.state_dir={cfg.train.state_dir or local_state_root(cfg)!r} is not shared by all "
                          f"ranks: rank {r} on {host} does not see {box[0]} that rank 0 on {seen[0][1]} wrote in "
                          f"{seen[0][2]} (rank {r} looked in {path}); point train.state_dir at a filesystem every "
                          "node mounts (not node-local scratch)")


def _same_place(root: str, run: str) -> bool:
    return storage.is_local(run) and os.path.abspath(root) == os.path.abspath(
        os.path.join(storage.local_path(run), "states"))


class Resume(NamedTuple):
    """The newest complete state: its step and the local folder holding it."""
    step: int
    folder: str


def find_resume(cfg) -> Resume | None:
    """The newest complete state that verifies, fetched locally if needed; None for a fresh run. A
    damaged state (a file truncated or changed since its COMPLETE) is skipped with one line naming
    the file, and never loaded. Rank 0 decides and every rank gets the same answer (collective)."""
    box = [None, ""]
    if _rank() == 0:
        try:
            box[0] = _newest_verified(cfg)
        except StateError as e:
            box[1] = str(e)
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[1]:
        raise StateError(box[1])
    return box[0]


def _newest_verified(cfg) -> Resume | None:
    run, root = cfg.train.run_dir, local_state_root(cfg)
    damaged = []
    for step, url in reversed(rundir.list_complete(run, "states")):
        folder = os.path.join(root, rundir.step_name(step))
        problem = verify(folder)
        if problem and not _same_place(root, run):
            _fetch(url, folder)  # the local copy is absent (another node) or damaged: the run's copy
            problem = verify(folder)
        if not problem:
            return Resume(step, folder)
        print(f"[train] the state at step {step} is damaged: {mask_secrets(problem)}; it is not loaded, an older "
              "state is tried", flush=True)
        damaged.append(step)
    if damaged:
        raise StateError(f"every complete state of {mask_secrets(run)} is damaged (steps {damaged}): restore one "
                         f"from a copy, or delete {mask_secrets(storage.join(run, 'states'))} to start afresh")
    return None


def _fetch(url: str, folder: str) -> None:
    """Copy a complete state from the run into `folder`: into a temporary folder first, then
    renamed, so a kill mid-copy never leaves a folder that looks complete (the marker may arrive
    before the files it vouches for). The caller verifies it."""
    tmp = folder.rstrip("/") + ".fetching"
    shutil.rmtree(tmp, ignore_errors=True)
    fs, path = storage.fs_path(url)
    storage.retry(lambda: fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True), f"fetching {url}")
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
