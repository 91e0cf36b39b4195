"""Flush time of the train log and TensorBoard on a bucket (the GCS emulator, fake-gcs-server), with
1,000 and 100,000 rows already logged: it must not grow with the run.

    .venv/bin/python bench/log_flush.py [--rows 1000,100000] [--window 100] [--repeat 5]

Each flush adds one log window (`--window` steps: train_log rows and TensorBoard scalars) to a run
that already holds `rows` steps: train_log.jsonl as parts of one window each (what TrainLog writes),
TensorBoard as event files already uploaded. "Whole history" is what a flush cost before: the whole
train_log.jsonl rewritten, the TensorBoard folder's event file re-uploaded. Median of --repeat flushes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from rin_scale import storage  # noqa: E402 - sets the emulator settings before gcsfs is imported


def row(step: int) -> dict:  # a train_log row as the trainer writes it
    return {"step": step, "loss": 0.123456789, "lr": 1e-4, "images_seen": step * 256, "grad_norm": 0.5,
            "skipped": False}


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def history(run: str, rows: int, window: int):
    """A run holding `rows` steps of log and TensorBoard, written as the trainer writes them."""
    from concurrent.futures import ThreadPoolExecutor

    from rin_scale.tblog import TBLog
    from rin_scale.train import TrainLog

    url = storage.join(run, "train_log.jsonl")
    with ThreadPoolExecutor(16) as pool:  # the parts, one per window (as many flushes)
        list(pool.map(lambda a: storage.append_jsonl(url, [row(s) for s in range(a, a + window)],
                                                     part=f"{a:012d}-{a + window - 1:012d}"),
                      range(1, rows + 1, window)))
    log, tb = TrainLog(run, 0, rows), TBLog(run)
    for s in range(1, rows + 1):
        tb.scalars({"train/loss": 0.1}, s)
    tb.flush()
    return log, tb


def measure(bucket: str, rows: int, window: int, repeat: int) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    log, tb = history(storage.join(bucket, f"run-{rows}"), rows, window)
    step = [rows]

    def flush_log():
        for s in range(step[0] + 1, step[0] + window + 1):
            log.append(row(s))
        step[0] += window
        log.flush()

    def flush_tb():
        for s in range(step[0] + 1, step[0] + window + 1):
            tb.scalars({"train/loss": 0.1}, s)
        step[0] += window
        tb.flush()

    new_log, new_tb = timed(flush_log, repeat), timed(flush_tb, repeat)
    tb.close()
    # What a flush cost before: the whole history rewritten / re-uploaded
    old = storage.join(bucket, f"old-{rows}")
    text = "".join(json.dumps(row(s)) + "\n" for s in range(1, rows + 1)).encode()
    old_log = timed(lambda: storage.write_bytes(storage.join(old, "train_log.jsonl"), text), repeat)
    local = tempfile.mkdtemp(prefix="log_flush_")
    with SummaryWriter(local) as w:
        for s in range(1, rows + 1):
            w.add_scalar("train/loss", 0.1, s)
    old_tb = timed(lambda: storage.put_dir(local, storage.join(old, "tb")), repeat)
    shutil.rmtree(local, ignore_errors=True)
    return {"rows": rows, "log": new_log, "log_before": old_log, "tb": new_tb, "tb_before": old_tb,
            "log_mb": len(text) / 1e6}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1000,100000", help="steps already logged, comma-separated")
    p.add_argument("--window", type=int, default=100, help="steps per flush (train.log_every)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    from conftest import free_port, start_fake_gcs

    port = free_port()
    server = start_fake_gcs(port, "-backend", "memory")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        fs, _ = storage.fs_path("gs://bench")
        fs.mkdir("bench")
        results = [measure("gs://bench", int(r), args.window, args.repeat) for r in args.rows.split(",")]
    finally:
        server.kill()
    print(f"| steps logged | train_log flush | before: whole file rewritten | TensorBoard flush | "
          f"before: folder re-uploaded |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['log'] * 1e3:.0f} ms | {r['log_before'] * 1e3:.0f} ms ({r['log_mb']:.1f} MB) | "
              f"{r['tb'] * 1e3:.0f} ms | {r['tb_before'] * 1e3:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
