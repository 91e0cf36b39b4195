"""How long the ranks wait on rank 0's saves, per 1,000 steps at a preset's cadence (issue #44).

    .venv/bin/python bench/rank0_wait.py                      # main's code against the working tree
    .venv/bin/python bench/rank0_wait.py --before REF --steps 60 --every 20

Trains the `tiny` preset (its widths, batch 64, data.workers=2, precision auto) with DeepSpeed ZeRO-2
on 2 processes under torchrun, train.run_dir on a bucket of a real GCS API server (fake-gcs-server)
and train.state_dir on local disk, a preview grid (samples and routing maps, the trainer's own
preview settings), a state and a snapshot every --every steps, as the preset does every 250
(--no-previews leaves the grid out). Each rank times its own train_step and maybe_save, and the
parts of a save (bench/_rank0_wait_proc.py wraps them). The wait of rank 1 is its loop's wall time
less what its steps cost without saves (the median step, times the steps), the first step left
out (paid once per job): the time inside a save's collectives, its own slice of the preview, and
the next step's all-reduce, where rank 1 waits for what rank 0 does alone.

The table gives the wait per save and, at each preset's cadence (a state, a snapshot and a preview
every 250 steps for tiny, every 1,000 for cifar10 and the imagenet presets), per 1,000 steps and
as a share of the wall time. Below it, each rank's time in a save's parts. "before" is a clean copy of --before
(default: the merge base with main), "after" the working tree.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before any gcsfs import

from _faults_proc import GCSServer, stop_everything  # noqa: E402

# Where the presets save (state, snapshot and preview together): tiny and tiny_video every 250
# steps, cifar10 and the imagenet presets every 1,000 (the config's defaults).
CADENCES = {"tiny": 250, "cifar10, imagenet*": 1000}


def checkout(ref: str, work: str) -> str:
    """A clean copy of `ref` (git archive) under work/; the bench's own wrapper comes from here."""
    src = os.path.join(work, "before")
    os.makedirs(src)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
    return src


def run(repo: str, work: str, name: str, gcs: GCSServer, steps: int, every: int, previews: bool) -> dict:
    """One training job; returns rank 1's timings: {"step": [...], "save": [...]} in seconds."""
    out = os.path.join(work, f"{name}-times")
    run_dir = f"gs://rank0-wait/{name}"
    args = ["tiny", f"data.shards={os.path.join(work, 'digits')}", f"train.run_dir={run_dir}",
            f"train.state_dir={os.path.join(work, name + '-states')}", f"train.total_steps={steps}",
            f"train.state_every={every}", f"train.snapshot_every={every}", f"train.sample_every={every if previews else 0}",
            f"train.log_every={every}", "data.workers=2", "train.warmup_steps=10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo, "STORAGE_EMULATOR_HOST": gcs.url}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "bench", "_rank0_wait_proc.py"), out, *args]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the trainer failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    with open(f"{out}-rank1.json") as f:
        times = json.load(f)
    with open(f"{out}-rank0.json") as f:
        times["rank0"] = json.load(f)
    return times


def wait_of(times: dict, every: int) -> dict:
    """Rank 1's wait in all, per save, and the step time without saves. The last step is left out:
    the final save waits for its upload by design (the run ends there), where a rank waits anyway."""
    step, save = times["step"][:-1], times["save"][:-1]
    plain = statistics.median(t for i, t in enumerate(step) if i % every != 0 and i > 0)  # not after a save
    # The first step (DeepSpeed's first pass, the loader's workers starting) is paid once per job,
    # not per save: left out of the wall time here, and shown apart.
    wall = sum(step[1:]) + sum(save[1:])
    waited = wall - plain * len(step[1:])
    saves = len(step) // every
    return {"step_s": plain, "wall_s": wall, "wait_s": waited, "per_save_s": waited / max(saves, 1), "saves": saves,
            "first_step_s": step[0], "parts": {k: sum(v) for k, v in times["rank0"].items() if k not in ("step", "save")},
            "parts1": {k: sum(v) for k, v in times.items() if k not in ("step", "save", "rank0")}}


def row(name: str, w: dict) -> str:
    """Per 1,000 steps at each preset cadence: the wait, and its share of the wall time."""
    cells = []
    for every in CADENCES.values():
        per_1000 = 1000 / every * w["per_save_s"]
        cells.append(f"{per_1000:.1f} s, {per_1000 / (1000 * w['step_s'] + per_1000):.1%}")
    return f"| {name} | {w['step_s']:.3f} | {w['saves']} | {w['wait_s']:.1f} | {w['per_save_s']:.2f} | " + \
        " | ".join(cells) + " |"


def crc32_seconds_per_gb(work: str, mb: int = 256) -> float:
    """What verifying a state costs: checkpoint's CRC-32 over a file just written (page cache)."""
    import time

    from rin_scale.checkpoint import _crc32

    path = os.path.join(work, "crc.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(mb << 20))
    t0 = time.perf_counter()
    _crc32(path)
    return (time.perf_counter() - t0) * 1024 / mb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/rank0_wait.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--before", default="", help="the code to compare with (default: git merge-base HEAD main)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=20, help="a state and a snapshot every this many steps")
    p.add_argument("--no-previews", dest="previews", action="store_false", help="no preview grids")
    args = p.parse_args(argv)
    ref = args.before or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.strip()
    work, times = tempfile.mkdtemp(prefix="rin-rank0-wait-"), {}
    try:
        subprocess.run([sys.executable, "-m", "data_tools.shard", "--embedded", "digits", "--split", "train",
                        "--quiet", os.path.join(work, "digits")], cwd=ROOT, check=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True)
        gcs = GCSServer(os.path.join(work, "gcs"), os.path.join(work, "gcs.log"))
        gcs.start()
        gcs.fs().mkdir("rank0-wait")
        for name, repo in (("before", checkout(ref, work)), ("after", ROOT)):
            times[name] = wait_of(run(repo, work, name, gcs, args.steps, args.every, args.previews), args.every)
        crc = crc32_seconds_per_gb(work)
    finally:
        stop_everything()
        shutil.rmtree(work, ignore_errors=True)
    print(f"tiny preset, 2 ranks ZeRO-2, {args.steps} steps, a state (to gs:// on fake-gcs-server) and a snapshot "
          f"every {args.every}" + (" with a preview grid" if args.previews else "") + " (the final one left out); "
          "the wait per 1,000 steps and its share of the wall time at each preset's cadence")
    heads = " | ".join(f"every {n} ({k})" for k, n in CADENCES.items())
    print(f"| code | step (s) | saves | rank 1 waited (s) | per save (s) | {heads} |")
    print("|---|---|---|---|---|" + "---|" * len(CADENCES))
    print(row(f"before ({ref[:10]})", times["before"]))
    print(row("after", times["after"]))
    for name in ("before", "after"):
        w = times[name]
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in w["parts"].items())
        parts1 = ", ".join(f"{k} {v:.2f} s" for k, v in w["parts1"].items())
        print(f"\n{name}: rank 1's first step took {w['first_step_s']:.2f} s. Time in a save's parts, in all "
              f"(the final save included): rank 0: {parts or 'not recorded'}; rank 1: {parts1 or 'not recorded'}")
    print(f"\nverifying a state (CRC-32, rin_scale.checkpoint) costs {crc:.2f} s per GB on one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
