"""The README's routing curves: read entropy and top-10% read share over training, from a run's
TensorBoard scalars (the trainer's routing/read_entropy/block<j>/t<t> and routing/read_top10/...).

    pip install matplotlib   # only this script needs it
    python docs/routing_curves.py RUN --out docs/demo_routing_curves.png

One panel per metric, one line per block and recorded noise level t, read back with TensorBoard's
own event reader; also prints the values at the first and last recorded step as a table.

    python docs/routing_curves.py RUN --ink 200

also samples 200 images (balanced classes) from the run's newest snapshot with the attention
recorded (rin_scale.routing) and prints, per block and t, whether reads land on the digit: the
share of the read mass on the quarter of the tokens whose patches hold the most ink in the final
sample (0.25 = blind to the strokes), and the correlation over tokens of read share and ink.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TAG = re.compile(r"routing/(read_entropy|read_top10)/block(\d+)/t([0-9.]+)$")
TITLES = {"read_entropy": "read entropy / log(tokens)  (1 = uniform, low = focused)",
          "read_top10": "share of read mass on the 10% most-read tokens  (0.1 = uniform)"}


def read_curves(run: str) -> dict:
    """{(metric, block, t): [(step, value), ...]} from RUN/tb."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rin_scale import storage

    acc = EventAccumulator(os.path.join(storage.local_path(run), "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        m = TAG.match(tag)
        if m:
            out[(m[1], int(m[2]), float(m[3]))] = [(e.step, e.value) for e in acc.Scalars(tag)]
    if not out:
        raise SystemExit(f"no routing/read_* scalars in {run}/tb: the trainer writes them at train.sample_every")
    return out


def ink_table(run: str, n: int, seed: int = 0) -> str:
    """Read mass on the inked patches of the final samples, per block and recorded t (see above)."""
    import torch
    from einops import rearrange

    from rin_scale import rundir
    from rin_scale.routing import AT, sample_with_routing
    from rin_scale.sample import resolve_snapshot

    snap, _ = resolve_snapshot(run)
    model, dcfg, meta = rundir.load_snapshot_model(snap, device="cpu")
    m = model.cfg
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *m.sample_shape), generator=gen)
    labels = torch.arange(n) % m.num_classes if m.num_classes else None
    x, records = sample_with_routing(model, noise, dcfg, labels, None, AT, dcfg.sample_steps, None, None, gen)
    p = m.patch_size
    ink = rearrange((x.clamp(-1, 1) + 1).mean(1) / 2, "b (h p) (w q) -> b (h w) (p q)", p=p, q=p).mean(-1)
    k = max(1, ink.shape[1] // 4)
    inked = torch.zeros_like(ink).scatter_(1, ink.topk(k, dim=1).indices, 1.0)
    lines = [f"{n} samples of {snap} (step {meta.get('step')}); ink = mean brightness of each token's patch\n",
             "| t | block | read share on the most-inked 25% of tokens | correlation of read share and ink |",
             "|---|---|---|---|"]
    for r in records:
        for j, rd in enumerate(r["read"]):
            share = rd["map"]
            on_ink = float((share * inked).sum(1).mean())
            a, b = share - share.mean(1, keepdim=True), ink - ink.mean(1, keepdim=True)
            corr = float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).mean())
            lines.append(f"| {r['t']:.2f} | {j} | {on_ink:.2f} | {corr:+.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a local run directory")
    p.add_argument("--out", default="routing_curves.png")
    p.add_argument("--ink", type=int, default=0, help="also the read-on-ink table over this many samples")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_curves(args.run)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    ts = sorted({t for _, _, t in curves}, reverse=True)
    for ax, metric in zip(axes, TITLES):
        for (m, block, t), pts in sorted(curves.items()):
            if m == metric:  # colour = noise level, line style = block
                ax.plot(*zip(*pts), label=f"block {block}, t={t:g}", color=f"C{ts.index(t)}",
                        linestyle=("-", "--", ":", "-.")[block % 4])
        ax.set_title(TITLES[metric], fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    print("| metric | block | t | first step | value | last step | value |\n|---|---|---|---|---|---|---|")
    for (m, block, t), pts in sorted(curves.items()):
        print(f"| {m} | {block} | {t:g} | {pts[0][0]} | {pts[0][1]:.3f} | {pts[-1][0]} | {pts[-1][1]:.3f} |")
    if args.ink:
        print(ink_table(args.run, args.ink))
    return 0


if __name__ == "__main__":
    sys.exit(main())
