"""Where a run stands, read from its run directory: `python -m launch.status RUN [--json]`.

Jobs and their states (RUN/launch.jsonl, plus the scheduler when it can be asked), the last
step and images seen (RUN/train_log.jsonl, else the newest snapshot), the newest complete state
and snapshot, and the evaluation of the newest step scored (the eval ledger, evals.ledger).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import typing as tp

from evals import ledger
from rin_scale import rundir, storage
from rin_scale.config import mask_secrets

from .job import read_log

# the state a job is in after each kind of launch-log row
_STATE = {"submitted": "PENDING", "started": "RUNNING", "requeued": "REQUEUED", "finished": "COMPLETED",
          "failed": "FAILED", "requeue_refused": "STOPPED"}
_ENDED = ("COMPLETED", "FAILED", "STOPPED")


def jobs(run: str) -> list[dict]:
    """One dict per submitted job, oldest first, from the launch log."""
    out: dict[tuple, dict] = {}
    for row in read_log(run):
        key = (row.get("kind", "train"), str(row.get("job_id", "")))
        job = out.setdefault(key, {"kind": key[0], "job_id": key[1], "requeues": 0, "reasons": [], "starts": 0})
        ev = row.get("event", "")
        if ev == "submitted":
            job.update(executor=row.get("executor"), nodes=row.get("nodes"),
                       tasks_per_node=row.get("tasks_per_node"), submitted=row.get("time"))
        if ev == "started":  # more starts than requeues + 1: the scheduler restarted it by itself
            job["world_size"] = row.get("world_size")
            job["starts"] += 1
        if ev in ("requeued", "requeue_refused"):
            if ev == "requeued":
                job["requeues"] = row.get("requeues", job["requeues"] + 1)
                job["reasons"].append(row.get("reason"))
            if row.get("why"):  # the failed rank's own line (a hang, a lost peer, a crash)
                job["why"] = row["why"]
        if ev in ("failed",):
            job["error"] = row.get("error")
        if ev in _STATE:
            job["state"] = _STATE[ev]
            job["updated"] = row.get("time")
    result = list(out.values())
    _live_states(result)
    return result


def _live_states(found: list[dict]) -> None:
    """Refine logged states with what the scheduler says, where it can be asked."""
    slurm = [j for j in found if j.get("executor") == "slurm" and j.get("state") not in _ENDED]
    if slurm and shutil.which("squeue"):
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(j["job_id"] for j in slurm)],
                                 capture_output=True, text=True, timeout=10).stdout
            live = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
            for j in slurm:
                if j["job_id"] in live:
                    j["scheduler_state"] = live[j["job_id"]]
        except (OSError, subprocess.SubprocessError):
            pass
    for j in found:
        # a local job's id is its controller's pid: gone without a last word means it was killed
        if j.get("executor") == "local" and j.get("state") not in _ENDED and j["job_id"].isdigit():
            try:
                os.kill(int(j["job_id"]), 0)
            except ProcessLookupError:
                j["state"] = "LOST"
            except PermissionError:
                pass


def progress(run: str) -> dict:
    """Last logged step and images seen (train log, else the newest snapshot's meta)."""
    last = storage.last_jsonl_row(storage.join(run, "train_log.jsonl"), lambda r: "step" in r)
    if last:
        return {k: last[k] for k in ("step", "images_seen", "loss", "time") if k in last}
    snap = rundir.newest_complete(run, "snapshots")
    if snap:
        try:
            meta = storage.read_json(storage.join(snap[1], "meta.json"))
            return {k: meta[k] for k in ("step", "images_seen") if k in meta}
        except (FileNotFoundError, ValueError):
            pass
    return {}


def total_steps(run: str) -> tp.Optional[int]:
    try:
        import yaml

        fs, path = storage.fs_path(storage.join(run, "config.yaml"))
        with fs.open(path, "r") as f:
            return int(yaml.safe_load(f)["train"]["total_steps"])
    except Exception:  # no config yet, or not ours: the total is optional
        return None


def status(run: str) -> dict:
    """Everything `launch.status` prints, as one JSON-able dict."""
    state = rundir.newest_complete(run, "states")
    snap = rundir.newest_complete(run, "snapshots")
    return {
        "run": run,
        "jobs": jobs(run),
        "progress": progress(run),
        "total_steps": total_steps(run),
        "newest_state": {"step": state[0], "url": state[1]} if state else None,
        "newest_snapshot": {"step": snap[0], "url": snap[1]} if snap else None,
        "newest_eval": ledger.newest(ledger.read(run)),
    }


def _when(t) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def render(s: dict) -> str:
    lines = [f"run: {s['run']}"]
    if not s["jobs"]:
        lines.append("jobs: none logged (RUN/launch.jsonl is empty)")
    for j in s["jobs"]:
        layout = f"{j.get('nodes', '?')}x{j.get('tasks_per_node', '?')}" if j.get("nodes") else ""
        live = f" (scheduler: {j['scheduler_state']})" if j.get("scheduler_state") else ""
        why = f" [{', '.join(r for r in j['reasons'] if r)}]" if j["reasons"] else ""
        err = f" error: {j['error']}" if j.get("error") else ""
        err += f"\n    last requeue: {j['why']}" if j.get("why") else ""
        lines.append(f"job {j['kind']:5s} {j['job_id']:>10s} {j.get('executor') or '':5s} {layout:5s} "
                     f"{j.get('state', '?')}{live}  starts {j['starts']}  requeues {j['requeues']}{why}  "
                     f"since {_when(j.get('updated'))}{err}")
    p = s["progress"]
    total = f" / {s['total_steps']}" if s.get("total_steps") else ""
    lines.append(f"step: {p.get('step', '-')}{total}   images seen: {p.get('images_seen', '-')}"
                 + (f"   loss: {p['loss']:.4g}" if isinstance(p.get("loss"), (int, float)) else ""))
    for key, label in (("newest_state", "newest state"), ("newest_snapshot", "newest snapshot")):
        v = s[key]
        lines.append(f"{label}: " + (f"step {v['step']}  {v['url']}" if v else "none"))
    e = s["newest_eval"]
    if e:
        metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in e.items()
                            if k not in ("snapshot", "time", "url") and not isinstance(v, (dict, list)))
        lines.append(f"newest eval: {metrics}")
    else:
        lines.append("newest eval: none")
    return "\n".join(lines)


def main(argv: tp.Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.status", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the run directory (local path or fsspec URL)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    fs, path = storage.fs_path(args.run)
    if not fs.exists(path):
        print(f"error: run directory {mask_secrets(args.run)} does not exist: pass the run's train.run_dir",
              file=sys.stderr)
        return 2
    s = status(args.run)
    print(mask_secrets(json.dumps(s) if args.json else render(s)))  # URLs in it may carry a credential
    return 0


if __name__ == "__main__":
    sys.exit(main())
