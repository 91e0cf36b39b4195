"""Host syncs per training step: the calls that make the host wait for a GPU (Tensor.item, float(),
int(), bool(), tolist(), cpu(), numpy()), counted inside train_step while the real trainer runs,
by the code that made them (the project, DeepSpeed, torch), apart for the steps that read the
window back (log and save steps) and the others. The CPU analogue of
torch.cuda.set_sync_debug_mode: on the CPU nothing waits, but every such call would on a GPU.

    .venv/bin/python bench/host_syncs.py DATA_SHARDS [--steps 20] [--log-every 10]

One process, the tiny preset made small, ZeRO-2, LAMB; prints a table. Run it against another
checkout (PYTHONPATH=OTHER) for a before/after.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

import torch

METHODS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")


WHERE = collections.Counter()  # the project's calls by file:line (--where)


def who(frame) -> str:
    """The first of rin_scale / deepspeed on the stack above the call (torch itself otherwise)."""
    f = frame.f_back
    while f is not None:
        path = f.f_code.co_filename
        for name in ("rin_scale", "deepspeed"):
            if f"{os.sep}{name}{os.sep}" in path:
                if name == "rin_scale":
                    WHERE[f"{os.path.basename(path)}:{f.f_lineno}"] += 1
                return name
        f = f.f_back
    return "torch"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("shards")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-every", type=int, default=10)
    a = p.parse_args()
    from rin_scale import train as tr_mod

    counts, state = collections.Counter(), {"on": False}
    for m in METHODS:
        orig = getattr(torch.Tensor, m)

        def counted(self, *args, _orig=orig, **kw):
            if state["on"]:
                counts[who(sys._getframe())] += 1
            return _orig(self, *args, **kw)
        setattr(torch.Tensor, m, counted)

    per_step = []
    real_step = tr_mod.train_step

    def step(tr, st, meter):
        counts.clear()
        state["on"] = True
        try:
            return real_step(tr, st, meter)
        finally:
            state["on"] = False
            per_step.append((st.step, dict(counts)))
    tr_mod.train_step = step
    run = tempfile.mkdtemp(prefix="host_syncs_")
    tr_mod.main(["tiny", f"data.shards={a.shards}", f"train.run_dir={run}", "model.latent_dim=64",
                 "model.interface_dim=64", "model.latent_heads=4", "model.read_write_heads=4", "model.num_latents=16",
                 "train.global_batch=8", "train.zero_stage=2", "data.workers=0", "train.sample_every=0",
                 f"train.total_steps={a.steps}", f"train.log_every={a.log_every}",
                 f"train.state_every={10**6}", f"train.snapshot_every={10**6}"])
    read = [c for s, c in per_step if s % a.log_every == 0 or s == a.steps]
    other = [c for s, c in per_step if not (s % a.log_every == 0 or s == a.steps)]
    print(f"\nhost syncs per step in train_step ({len(per_step)} steps, ZeRO-2, 1 rank, log every {a.log_every}):")
    print("| steps | project | DeepSpeed | torch |\n| --- | --- | --- | --- |")
    for label, rows in (("log steps", read), ("other steps", other)):
        n = max(len(rows), 1)
        print(f"| {label} | " + " | ".join(f"{sum(r.get(k, 0) for r in rows) / n:.1f}"
                                          for k in ("rin_scale", "deepspeed", "torch")) + " |")
    print("the project's, over all steps, by place: " + ", ".join(f"{k} {v}" for k, v in WHERE.most_common()))


if __name__ == "__main__":
    main()
