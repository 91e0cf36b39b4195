"""The video demo's model in process (no DeepSpeed), scored with the eval service's frame measures.

    OMP_NUM_THREADS=2 .venv/bin/python bench/video_demo.py [--steps 1500 | --minutes M] [--samples 64]
        [--sample-steps 50] [--seed 0] [--grid strips.png] [--static] [overrides ...]

The tiny_video preset plus `section.key=value` overrides trains on the embedded moving digits'
training clips (sharded by data_tools.shard into --data the first time, decoded once into memory;
a random window of model.frames per clip, as the data pipeline takes it) with the trainer's
optimizer, LR schedule, EMA and loss, batch train.global_batch. Then the EMA model predicts the
held-out clips' continuations (their given frames as conditioning, fixed noise) and one JSON row
gives evals.video_metrics' measures: per-frame MSE beside the repeat-last and data-mean baselines,
and the digit recognised in predicted frames, and whether the model uses the given frames at all:
the per-frame MSE of its one-pass x0 prediction at gamma = 0.3 with each clip's own given frames
and with another clip's; and what its latents carry in that pass (`latent_use`: their rms, each
block's write entropy, and how much of the first given frame a ridge probe recovers from them,
beside the same probe on the stem's tokens). The tool behind the tiny_video preset's settings.

--static holds every clip still (each frame = its first, for training and the held-out clips): a
diagnostic that needs no motion, only copying the given digit into the predicted frames.

    .venv/bin/python bench/video_demo.py --strips RUN --grid docs/video_demo_strips.png

draws the README's strips from a run's newest snapshot instead: the first 8 of the held-out clips
the eval service scores (same clips, same noise), given + predicted frames over given + true ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rin_scale.config import load_config, scored_clips  # noqa: E402

DATA = "runs/bench-data"


def shard(root: str, split: str) -> str:
    url = os.path.join(root, f"moving_digits-{split}")
    if not os.path.exists(os.path.join(url, "data-manifest.json")):
        subprocess.run([sys.executable, "-m", "data_tools.shard", "--embedded", "moving_digits", "--split", split, url],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return url


def load_clips(url: str, model_cfg, frames: int) -> torch.Tensor:
    """Every clip at url, whole (frames long), in [-1, 1]."""
    from evals.video_metrics import read_clips

    m = dataclasses.replace(model_cfg, frames=frames)
    return read_clips(url, m, 10**9)[0]


def random_windows(clips: torch.Tensor, b: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """b windows of t frames from random clips at random starts, as the data pipeline takes them."""
    idx = torch.randint(0, len(clips), (b,), generator=gen)
    start = torch.randint(0, clips.shape[2] - t + 1, (b,), generator=gen)
    return torch.stack([clips[i, :, s:s + t] for i, s in zip(idx.tolist(), start.tolist())])


def train(cfg, clips: torch.Tensor, seed: int, steps: int = 0, minutes: float = 0.0, log=print):
    """The video model trained in process (bench/_inproc.py) on random windows of the clips."""
    from _inproc import fit

    from rin_scale.train import split_clip

    def make_batches(gen):
        def batch():
            x0, cond = split_clip(random_windows(clips, cfg.train.global_batch, cfg.model.frames, gen), cfg.model)
            return x0, {"cond": cond}
        return batch

    return fit(cfg, seed, make_batches, steps, minutes, log)


@torch.no_grad()
def evaluate(model, cfg, ref, probe_clips, samples: int, sample_steps: int, sampler: str, grid: str = "") -> dict:
    from evals.video_metrics import VideoScore
    from rin_scale.diffusion import sample_clip

    m, k = cfg.model, cfg.model.cond_frames
    score, gen, preds, t0 = VideoScore(ref, k), torch.Generator().manual_seed(cfg.train.seed), [], time.time()
    for start in range(0, samples, 16):
        cond = ref.clips[start:start + 16, :, :k]
        x = sample_clip(model, cond, ref.clips.shape[2], cfg.diffusion, steps=sample_steps, sampler=sampler,
                        generator=gen)
        score.update(x, start)
        preds.append(x)
    out = score.result()
    out["sample_seconds"] = round(time.time() - t0, 1)
    out.update(conditioning_use(model, cfg, ref.clips[:samples, :, :m.frames]))
    out.update(latent_use(model, cfg, *probe_clips))
    if grid:
        save_strips(ref.clips[:8], torch.cat(preds)[:8], k, grid)
    return out


def one_pass_inputs(cfg, clips: torch.Tensor, gamma: float):
    """(given frames, x0, gamma per clip, x_t) of clips, scaled as training_loss scales them, with
    fixed noise (seed 0) at gamma."""
    d, k = cfg.diffusion, cfg.model.cond_frames
    cond, x0 = clips[:, :, :k] * d.input_scale, clips[:, :, k:] * d.input_scale
    g = torch.full((len(clips),), gamma)
    x_t = gamma ** 0.5 * x0 + (1 - gamma) ** 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    return cond, x0, g, x_t


@torch.no_grad()
def conditioning_use(model, cfg, clips: torch.Tensor, gamma: float = 0.3) -> dict:
    """Per-frame MSE of one x0 prediction (fixed noise at gamma) given each clip's own given
    frames, and given the next clip's: equal rows = the prediction ignores the given frames."""
    from rin_scale.diffusion import predict_x0

    d = cfg.diffusion
    cond, x0, g, x_t = one_pass_inputs(cfg, clips, gamma)
    out = {}
    for name, c in (("own", cond), ("shuffled", cond.roll(1, 0))):
        pred = predict_x0(model(x_t, g, None, None, c)[0].float(), x_t, g, d.target, d.input_scale)
        err = (pred - x0).div(d.input_scale).pow(2).mean(dim=(0, 1, 3, 4))
        out[f"x0_mse_{name}_given_frames"] = [round(float(v), 4) for v in err]
    return out


def ridge_r2(a_train, y_train, a_test, y_test, lams=(0.01, 0.1, 1.0)) -> float:
    """Held-out R^2 of ridge regression from features a to targets y (features standardized on the
    training rows; penalty lam * rows, in the dual form), the best over lams."""
    mu, sd = a_train.mean(0), a_train.std(0) + 1e-6
    a, b = (a_train - mu) / sd, (a_test - mu) / sd
    ym = y_train.mean(0)
    best = -float("inf")
    for lam in lams:
        w = a.T @ torch.linalg.solve(a @ a.T + lam * len(a) * torch.eye(len(a)), y_train - ym)
        best = max(best, float(1 - (b @ w + ym - y_test).pow(2).sum() / (y_test - ym).pow(2).sum()))
    return round(best, 3)


@torch.no_grad()
def latent_use(model, cfg, train_clips: torch.Tensor, held_clips: torch.Tensor, gamma: float = 0.3) -> dict:
    """What the latents carry, from one pass at gamma (fixed noise): the final latents' rms; each
    block's write entropy over the latents (rin_scale.routing: 1 = a token reads every latent
    evenly, 0 = one latent); and how much of the first given frame a ridge probe recovers on the
    held-out clips (R^2, fitted on the training clips) from the final latents, and, as the probe's
    check, from the interface tokens of the first token-frame (the stem's output, before any block)."""
    from rin_scale.routing import record_attention

    grid = (cfg.model.image_size // cfg.model.patch_size) ** 2  # tokens per token-frame

    def passes(clips, record=False):
        lat, tok, ent = [], [], []
        for i in range(0, len(clips), 128):
            cond, _, g, x_t = one_pass_inputs(cfg, clips[i:i + 128], gamma)
            with record_attention(model) as rec:
                rec.on = record
                lat.append(model(x_t, g, None, None, cond)[1].float().flatten(1))
            if record:
                ent.append(torch.stack([w["entropy"].mean(1) for w in rec.records[-1]["write"]], 1))
            tok.append(model.tokenize(model.stem_input(x_t, cond))[:, :grid].float().flatten(1))
        return torch.cat(lat), torch.cat(tok), (torch.cat(ent).mean(0) if record else None)

    lat_tr, tok_tr, _ = passes(train_clips)
    lat_ho, tok_ho, ent = passes(held_clips, record=True)
    frame = lambda c: c[:, :, 0].flatten(1)  # noqa: E731
    return {"latent_rms": round(float(lat_ho.pow(2).mean().sqrt()), 2),
            "write_entropy_per_block": [round(float(v), 3) for v in ent],
            "given_frame_r2_from_latents": ridge_r2(lat_tr, frame(train_clips), lat_ho, frame(held_clips)),
            "given_frame_r2_from_tokens": ridge_r2(tok_tr, frame(train_clips), tok_ho, frame(held_clips))}


def still(clips: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) clips whose every frame is their first."""
    return clips[:, :, :1].expand_as(clips).clone()


def save_strips(clips: torch.Tensor, pred: torch.Tensor, k: int, path: str, zoom: int = 4, cols: int = 2) -> None:
    """Per clip two rows: given + predicted frames over given + true frames; clips in `cols`
    columns, `zoom`x nearest."""
    from PIL import Image

    from rin_scale.media import to_uint8

    blocks = []
    for clip, p in zip(clips, pred):
        rows = [torch.cat([F.pad(f, (1, 1, 1, 1), value=0.2) for f in frames.unbind(1)], 2)
                for frames in (torch.cat([clip[:, :k], p], 1), clip)]
        blocks.append(F.pad(torch.cat(rows, 1), (2, 2, 2, 2), value=1.0))
    while len(blocks) % cols:
        blocks.append(torch.full_like(blocks[0], 1.0))
    grid = torch.cat([torch.cat(blocks[r:r + cols], 2) for r in range(0, len(blocks), cols)], 1)
    img = to_uint8(grid).permute(1, 2, 0).numpy()
    Image.fromarray(img).resize((img.shape[1] * zoom, img.shape[0] * zoom), Image.NEAREST).save(path)


def strips(run: str, path: str, n: int = 8) -> int:
    from rin_scale import rundir
    from rin_scale.config import scored_clips
    from rin_scale.diffusion import sample_clip
    from rin_scale.rundir import load_run_config, load_snapshot_model

    from evals.video_metrics import video_reference

    cfg = scored_clips(load_run_config(run, []))
    step, url = rundir.newest_complete(run, "snapshots")
    model, dcfg, _ = load_snapshot_model(url, torch.device("cpu"))
    e, m = cfg.eval, cfg.model
    ref = video_reference(cfg.data.shards, e.classifier_data, m, e.num_samples)
    gen = torch.Generator().manual_seed(cfg.train.seed)  # as the eval service: its first batch
    x = sample_clip(model, ref.cond(m.cond_frames)[:e.batch], m.frames, dcfg, steps=e.steps or dcfg.sample_steps,
                    sampler=e.sampler or dcfg.sampler, generator=gen)
    save_strips(ref.clips[:n], x[:n], m.cond_frames, path)
    print(f"{path}: step {step}, held-out clips {ref.labels[:n].tolist()}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--minutes", type=float, default=0.0)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=0)
    p.add_argument("--sampler", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=DATA)
    p.add_argument("--grid", default="")
    p.add_argument("--out", default="runs/video_demo.jsonl")
    p.add_argument("--save", default="", help="write the EMA weights here (torch.save of the state dict)")
    p.add_argument("--load", default="", help="evaluate these EMA weights instead of training")
    p.add_argument("--strips", default="", help="a run directory: strips of its newest snapshot to --grid")
    p.add_argument("--static", action="store_true", help="every clip held still: copying only, no motion")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from evals.video_metrics import video_reference

    if args.strips:
        return strips(args.strips, args.grid or "strips.png")

    cfg = load_config("tiny_video", args.overrides)
    train_url, held_url = shard(args.data, "train"), shard(args.data, "heldout")
    ref = video_reference(train_url, held_url, scored_clips(cfg).model, args.samples)
    clips, held = load_clips(train_url, cfg.model, 16), load_clips(held_url, cfg.model, 16)
    if args.static:
        clips, held, ref = still(clips), still(held), ref._replace(clips=still(ref.clips))
    print(f"{len(clips)} training clips, {args.overrides}", flush=True)
    if args.load:
        from rin_scale.model import RIN

        model, info = RIN(cfg.model), {"loaded": args.load}
        model.load_state_dict(torch.load(args.load, weights_only=True))
        model.eval()
    else:
        model, info = train(cfg, clips, args.seed, args.steps, args.minutes)
    if args.save:
        torch.save(model.state_dict(), args.save)
    # the latent probe's clips: the first model.frames of every training and held-out clip
    probe = [c[:, :, :cfg.model.frames] for c in (clips, held)]
    res = evaluate(model, cfg, ref, probe, args.samples, args.sample_steps or cfg.diffusion.sample_steps,
                   args.sampler or cfg.diffusion.sampler, args.grid)
    row = {"overrides": args.overrides, "seed": args.seed, "static": args.static, **info, "sampler": args.sampler,
           "sample_steps": args.sample_steps, **res,
           "params": sum(q.numel() for q in model.parameters())}
    print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
