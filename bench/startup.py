"""Trainer start-up: how long a 2-rank `tiny` launch (torchrun, ZeRO-2, 2 data workers) takes to its
set-up line, its first step and its exit. Most of the test suite's time is launches like this one,
and a requeued job pays the start-up again.

    .venv/bin/python bench/startup.py                                  # this checkout, 3 launches
    .venv/bin/python bench/startup.py --repo ../old-checkout --repo .  # A/B, launches alternating

Prints one row per launch and the medians per checkout (seconds from the launch).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["model.latent_dim=64", "model.interface_dim=64", "model.latent_heads=4", "model.read_write_heads=4",
             "model.num_latents=16", "diffusion.sample_steps=4", "train.sample_count=4", "train.zero_stage=2",
             "train.global_batch=8", "train.total_steps=4", "train.log_every=1", "train.state_every=2",
             "train.snapshot_every=4", "train.sample_every=4", "data.workers=2"]
MARKS = {"set-up line": " rank(s) on ", "first step": "[train] step ", "done line": "[train] done"}


def launch(repo: str, shards: str, run: str) -> dict:
    """Seconds from the launch to each of MARKS' lines and to the exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "rin_scale.train", "tiny", f"data.shards={shards}", f"train.run_dir={run}", *OVERRIDES]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    t0 = time.perf_counter()
    seen, tail = {}, []
    with subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            tail = (tail + [line])[-20:]
            for name, mark in MARKS.items():
                if name not in seen and mark in line:
                    seen[name] = time.perf_counter() - t0
    if p.returncode != 0 or len(seen) < len(MARKS):
        raise SystemExit(f"the launch in {repo} failed (exit {p.returncode}):\n{''.join(tail)}")
    return {**seen, "exit": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", action="append", help="a checkout to launch from (repeat for A/B; default: this one)")
    ap.add_argument("--rounds", type=int, default=3, help="launches per checkout")
    args = ap.parse_args()
    repos = [os.path.abspath(r) for r in (args.repo or [ROOT])]
    with tempfile.TemporaryDirectory(prefix="rin_startup_") as tmp:
        shards = os.path.join(tmp, "digits")
        subprocess.run([sys.executable, "-m", "data_tools.shard", "--embedded", "digits", "--split", "train",
                        "--quiet", shards], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, check=True,
                       capture_output=True)
        cols = [*MARKS, "exit"]
        print("| checkout | launch | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols), flush=True)
        times = {r: [] for r in repos}
        for i in range(args.rounds):
            for repo in repos:  # alternating: a machine that slows down mid-run slows both alike
                t = launch(repo, shards, os.path.join(tmp, f"run-{len(times[repo])}-{repos.index(repo)}"))
                times[repo].append(t)
                print(f"| {repo} | {i + 1} | " + " | ".join(f"{t[c]:.2f}" for c in cols) + " |", flush=True)
        for repo in repos:
            print(f"| {repo} | median | " + " | ".join(f"{statistics.median(t[c] for t in times[repo]):.2f}"
                                                     for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
