"""What a cheaper eval sampler costs and loses: FID / domain FID of one snapshot per sampler setting.

    python bench/eval_samplers.py RUN [--step N] [--samples 1000] [--settings ddpm:1000,ddim:250,...]

Copies the snapshot (never writes into RUN) into a scratch run per setting, scores it with the eval
service (eval.sampler, eval.steps) and prints a markdown table: metric values, sampling seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

DEFAULT = "ddpm:1000,ddim:250,ddim:100,ddim:50,ddpm:100"


def scratch_run(run: str, step: int, root: str) -> str:
    """A run folder holding only config.yaml and the one snapshot."""
    name = f"step-{step:09d}"
    os.makedirs(f"{root}/snapshots")
    shutil.copy(f"{run}/config.yaml", f"{root}/config.yaml")
    shutil.copytree(f"{run}/snapshots/{name}", f"{root}/snapshots/{name}")
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--step", type=int, default=0, help="snapshot step (default: the newest)")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--settings", default=DEFAULT, help="sampler:steps, comma separated")
    args = p.parse_args(argv)
    from rin_scale import rundir
    from evals.service import Service

    step = args.step or rundir.newest_complete(args.run, "snapshots")[0]
    table = []
    for setting in args.settings.split(","):
        sampler, steps = setting.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            run = scratch_run(args.run, step, f"{tmp}/run")
            svc = Service(run, [f"eval.sampler={sampler}", f"eval.steps={steps}",
                                f"eval.num_samples={args.samples}"], progress=False)
            svc.run_once()
            rows = {r["metric"]: r for r in svc_rows(run)}
            svc.close()
        fid = rows.get("fid", {})
        table.append((sampler.upper(), steps, fid.get("value"), rows.get("domain_fid", {}).get("value"),
                      rows.get("class_accuracy", {}).get("value"), fid.get("sample_seconds")))
        print(json.dumps(table[-1]), file=sys.stderr, flush=True)
    print(f"step {step}, {args.samples} samples per setting\n")
    print("| sampler | steps | FID | domain FID | class accuracy | sampling s |\n|---|---|---|---|---|---|")
    for s, n, fid, dom, acc, sec in table:
        print(f"| {s} | {n} | {_f(fid)} | {_f(dom)} | {_f(acc, 3)} | {_f(sec, 0)} |")


def svc_rows(run: str) -> list[dict]:
    from evals import ledger

    return ledger.read(run)


def _f(v, digits=4):
    return "-" if v is None else f"{v:.{digits}f}"


if __name__ == "__main__":
    main()
