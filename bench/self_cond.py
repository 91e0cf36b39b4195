"""Latent self-conditioning at the demo's scale: self_cond_rate 0.9 (the paper's) vs 0, same steps.

    OMP_NUM_THREADS=2 .venv/bin/python bench/self_cond.py [--rates 0.9 0] [--seeds 0 1 2] [--steps 600]
        [--samples 500] [--sample-steps 50] [--minutes M] [--out runs/self_cond.jsonl] [overrides ...]

In process, no DeepSpeed: the demo's model (the `tiny` preset plus any `section.key=value`
overrides) trains on the embedded digits' training split (1,437 images; sharded by data_tools.shard
into --data the first time) with the trainer's own optimizer and LR schedule (rin_scale.optim),
EMA (rin_scale.ema, with the preset's decay and warmup) and loss (diffusion.training_loss), batch
train.global_batch, for --steps steps (train.total_steps is set to it, so the LR schedule is the
whole schedule, squeezed). --minutes instead times the first steps and sets the step count that
fills that much wall time (equal-time comparisons of settings that cost differently).

Each run then draws --samples samples from the EMA weights (DDIM, --sample-steps, no guidance,
balanced labels, fixed noise) and prints one row: domain FID (evals.digits_cnn: a CNN trained on
the real training digits; the floor is real held-out digits' own distance), class accuracy (the
eval service's SVM on the held-out digits), the mean |Laplacian| ratio samples / real held-out
(1 = as smooth as real digits), the training loss over the last 10% of steps, and a held-out loss
(the 360 held-out digits at fixed t and noise, self-conditioned as in training). Rows go to --out
as JSON lines too; the table at the end gives each rate's mean and spread over the seeds.

Also the tool behind the demo's settings: the same harness with other overrides, e.g.
    bench/self_cond.py --rates 0.9 --seeds 0 --minutes 4 model.patch_size=1
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rin_scale.config import ModelConfig, load_config  # noqa: E402

DATA = "runs/bench-data"
STEPS = 800


def shard_digits(root: str) -> tuple[str, str]:
    """(train, heldout) shard folders of the embedded digits under root, written once."""
    import subprocess

    out = []
    for split in ("train", "heldout"):
        url = os.path.join(root, f"digits-{split}")
        if not os.path.exists(os.path.join(url, "data-manifest.json")):
            # written aside and renamed: two invocations started together each shard, one folder wins
            tmp = f"{url}.tmp{os.getpid()}"
            subprocess.run([sys.executable, "-m", "data_tools.shard", "--embedded", "digits", "--split", split, tmp],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                os.rename(tmp, url)
            except OSError:  # another invocation got there first
                shutil.rmtree(tmp, ignore_errors=True)
        out.append(url)
    return out[0], out[1]


class Data:
    """The real digits in memory, and the eval pieces that depend only on them."""

    def __init__(self, root: str, cache_dir: str, model_cfg: ModelConfig):
        from evals.classifier import get_classifier
        from evals.digits_cnn import domain_reference, load_images

        self.train_url, self.heldout_url = shard_digits(root)
        self.x, self.y = load_images(self.train_url, model_cfg)
        self.xh, self.yh = load_images(self.heldout_url, model_cfg)
        self.domain = domain_reference(self.train_url, self.heldout_url, model_cfg, cache_dir, progress=False)
        self.classifier = get_classifier(self.heldout_url, model_cfg)


def train(cfg, data: Data, seed: int, steps: int = 0, minutes: float = 0.0, log=None):
    """A RIN trained as the trainer trains it, without DeepSpeed (bench/_inproc.py), on the
    training digits in shuffled epochs. Returns (EMA model, {steps, train_seconds, train_loss})."""
    from _inproc import fit

    b, n = cfg.train.global_batch, len(data.x)

    def make_batches(gen):
        order, pos = torch.randperm(n, generator=gen), 0

        def batch():
            nonlocal order, pos
            if pos + b > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + b]
            pos += b
            return data.x[idx], {"labels": data.y[idx]}
        return batch

    return fit(cfg, seed, make_batches, steps, minutes, log)


@torch.no_grad()
def evaluate(model, cfg, data: Data, samples: int = 500, sample_steps: int = 50, sampler: str = "ddim",
             seed: int = 0, grid: str = "") -> dict:
    """Domain FID, its floor, class accuracy, Laplacian ratio and held-out loss of an EMA model."""
    from evals.classifier import balanced_labels
    from evals.digits_cnn import DomainScore
    from rin_scale.diffusion import sample, training_loss

    m = cfg.model
    labels = balanced_labels(samples, m.num_classes)
    gen = torch.Generator().manual_seed(seed)
    score, correct, xs = DomainScore(data.domain), 0, []
    t0 = time.time()
    for i in range(0, samples, 100):
        lb = labels[i:i + 100]
        x = sample(model, (len(lb), *m.sample_shape), cfg.diffusion, labels=lb, steps=sample_steps, sampler=sampler,
                   generator=gen, guidance=0.0).float().clamp(-1, 1)
        score.update(x)
        correct += int((data.classifier.predict(x) == lb.numpy()).sum())
        xs.append(x)
    out = score.result()
    out["class_accuracy"] = correct / samples
    out["sample_seconds"] = round(time.time() - t0, 1)
    hgen = torch.Generator().manual_seed(12345)
    loss, _ = training_loss(model, data.xh, cfg.diffusion, labels=data.yh, generator=hgen)
    out["heldout_loss"] = float(loss)
    if grid:
        from torchvision.utils import save_image

        from rin_scale.tblog import sample_grid

        g = sample_grid(torch.cat(xs)[:40], nrow=m.num_classes)  # as docs/demo_samples.png: 4x
        save_image(g.repeat_interleave(4, 1).repeat_interleave(4, 2), grid)
    return out


def summarize(rows: list[dict], key: str) -> list[dict]:
    out = []
    for value in dict.fromkeys(r[key] for r in rows):
        group = [r for r in rows if r[key] == value]
        s = {key: value, "runs": len(group)}
        for k in ("domain_fid", "class_accuracy", "laplacian_ratio", "train_loss", "heldout_loss", "steps"):
            vals = np.array([r[k] for r in group], float)
            s[k] = (float(vals.mean()), float(vals.std()))
        out.append(s)
    return out


def run_one(args, rate: float, seed: int, data: Data, log) -> dict:
    cfg = load_config("tiny", args.overrides + [f"diffusion.self_cond_rate={rate}"])
    log(f"rate {rate} seed {seed}")
    model, info = train(cfg, data, seed, steps=args.steps, minutes=args.minutes, log=log)
    name = f"{args.tag}-r{rate}-s{seed}"
    if args.save:
        torch.save(model.state_dict(), f"{args.save}{name}.pt")
    ev = evaluate(model, cfg, data, args.samples, args.sample_steps, args.sampler, seed=seed,
                  grid=f"{args.grid}{name}.png" if args.grid else "")
    row = {"tag": args.tag, "overrides": args.overrides, "self_cond_rate": rate, "seed": seed, **info, **ev}
    log(f"  rate {rate} seed {seed} -> domain FID {ev['domain_fid']:.3f} (floor {ev['domain_fid_floor']:.3f}), "
        f"class accuracy {ev['class_accuracy']:.3f}, Laplacian ratio {ev['laplacian_ratio']:.2f}, train loss "
        f"{info['train_loss']:.4f}, held-out loss {ev['heldout_loss']:.4f}")
    return row


def run_parallel(args, argv: list[str], log) -> list[dict]:
    """Each (rate, seed) in its own one-thread process, --jobs at a time; their rows, in order."""
    import subprocess
    import tempfile

    todo = [(r, s) for r in args.rates for s in args.seeds]
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.out))) as tmp:
        running, outs = [], {}
        for r, s in todo:
            while sum(q.poll() is None for q in running) >= args.jobs:
                time.sleep(1)
            out = os.path.join(tmp, f"r{r}-s{s}.jsonl")
            outs[(r, s)] = out
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--rates", str(r), "--seeds", str(s),
                   "--jobs", "1", "--out", out, "--quiet"]
            running.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))
        failed = [q.args for q in running if q.wait() != 0]
        rows = []
        for key in todo:
            if os.path.exists(outs[key]):
                rows += [json.loads(line) for line in open(outs[key])]
        if failed or len(rows) != len(todo):
            log(f"{len(todo) - len(rows)} run(s) failed")
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[0.9, 0.0], help="diffusion.self_cond_rate values")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps per run (default {STEPS})")
    p.add_argument("--minutes", type=float, default=0.0, help="instead of --steps: train this long per run")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--sample-steps", type=int, default=0, help="DDIM steps (default: the preset's)")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each in its own one-thread process")
    p.add_argument("--data", default=DATA, help="where the digits are sharded (once)")
    p.add_argument("--cache-dir", default="~/.cache/rin_scale", help="digits CNN and its reference")
    p.add_argument("--out", default="runs/self_cond.jsonl", help="JSON lines, one per run (appended)")
    p.add_argument("--grid", default="", help="save each run's first 40 samples as PNG: this prefix + tag")
    p.add_argument("--tag", default="", help="a label for this invocation's rows")
    p.add_argument("--save", default="", help="save each run's EMA weights (a state dict): this prefix + tag")
    p.add_argument("--quiet", action="store_true", help="no table (a worker of --jobs)")
    p.add_argument("overrides", nargs="*", help="config overrides on top of the tiny preset")
    args = p.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    from rin_scale.model import RIN

    base = load_config("tiny", args.overrides)
    args.sample_steps = args.sample_steps or base.diffusion.sample_steps
    data = Data(args.data, args.cache_dir, base.model)  # shards, CNN and classifier, before any worker
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t_all = time.time()
    if args.jobs > 1 and len(args.rates) * len(args.seeds) > 1:
        strip = {"--rates", "--seeds", "--jobs", "--out"}
        passed, skip = [], False
        for a in argv:  # the child gets everything but what run_parallel sets per run
            if a in strip:
                skip = True
                continue
            if skip and (a.startswith("--") or "=" in a):
                skip = False
            if not skip:
                passed.append(a)
        rows = run_parallel(args, passed, log)
    else:
        rows = []
        for rate in args.rates:
            for seed in args.seeds:
                row = run_one(args, rate, seed, data, log)
                rows.append(row)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    if args.quiet:
        return 0
    params = sum(q.numel() for q in RIN(base.model).parameters())
    print(f"\ntiny {' '.join(args.overrides)} ({params / 1e6:.2f}M parameters): {rows[0]['steps'] if rows else 0} "
          f"steps of batch {base.train.global_batch}, {args.samples} samples per run ({args.sampler.upper()} "
          f"{args.sample_steps}, no guidance), seeds {args.seeds}; domain FID floor {data.domain.floor:.2f} "
          f"({data.domain.floor_n} real held-out vs {data.domain.n} training digits); "
          f"{(time.time() - t_all) / 60:.1f} min\n")
    print("| self_cond_rate | runs | domain FID | class accuracy | Laplacian ratio | train loss | held-out loss |")
    print("|---|---|---|---|---|---|---|")
    for s in summarize(rows, "self_cond_rate"):
        f = lambda k, d: f"{s[k][0]:.{d}f} ± {s[k][1]:.{d}f}"  # noqa: E731
        print(f"| {s['self_cond_rate']} | {s['runs']} | {f('domain_fid', 2)} | {f('class_accuracy', 3)} | "
              f"{f('laplacian_ratio', 2)} | {f('train_loss', 4)} | {f('heldout_loss', 4)} |")
    print("\n(mean ± std over seeds) per run:")
    for r in rows:
        print(f"  rate {r['self_cond_rate']} seed {r['seed']}: domain FID {r['domain_fid']:.3f}, class accuracy "
              f"{r['class_accuracy']:.3f}, Laplacian ratio {r['laplacian_ratio']:.2f}, train loss {r['train_loss']:.4f}, "
              f"held-out loss {r['heldout_loss']:.4f}, {r['steps']} steps in {r['train_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
