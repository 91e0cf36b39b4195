"""What next-frame regression reaches on the video demo's data: a reference for the demo's scores.

    OMP_NUM_THREADS=1 .venv/bin/python bench/video_ceiling.py [--model cnn|rin] [--steps 6000] [overrides ...]

No diffusion: a model maps the two given frames to the next one by mean squared error (AdamW 2e-3,
batch 16, warmup 100, random 3-frame windows of the moving digits' training clips, as the demo
trains). `cnn` is a plain 6-layer 3x3 conv net (64 wide), which has the shift's translation symmetry
built in; `rin` is the tiny_video RIN (plus overrides) given pure noise at gamma ~0, i.e. its
one-pass x0 guess. Scored on the eval service's 64 held-out clips: the next frame (MSE, digit
recognised) and the clip extended to 8 frames, each prediction the next one's given frame.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import video_demo as vd  # noqa: E402
from rin_scale.config import load_config, scored_clips  # noqa: E402


def conv_net(width: int = 64, layers: int = 6) -> nn.Module:
    body = [nn.Conv2d(6, width, 3, padding=1), nn.GELU()]
    for _ in range(layers - 2):
        body += [nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
    return nn.Sequential(nn.Flatten(1, 2), *body, nn.Conv2d(width, 3, 3, padding=1))  # (B, C, 2, H, W) in


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("cnn", "rin"), default="cnn")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--out", default="")
    p.add_argument("overrides", nargs="*", help="tiny_video overrides (--model rin)")
    args = p.parse_args(argv)
    from evals.video_metrics import video_reference
    from rin_scale.model import RIN

    cfg = load_config("tiny_video", args.overrides)
    train_url, held_url = vd.shard(vd.DATA, "train"), vd.shard(vd.DATA, "heldout")
    ref = video_reference(train_url, held_url, scored_clips(cfg).model, 64)
    clips = vd.load_clips(train_url, cfg.model, 16)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = conv_net() if args.model == "cnn" else RIN(cfg.model)

    def predict(given):  # (B, C, 2, H, W) -> (B, C, H, W)
        if args.model == "cnn":
            return net(given)
        b, c, _, h, w = given.shape
        return net(torch.zeros(b, c, 1, h, w), torch.full((b,), 1e-9), cond=given)[0][:, :, 0]

    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 100))
    t0 = time.time()
    for k in range(1, args.steps + 1):
        w = vd.random_windows(clips, 16, 3, gen)
        loss = F.mse_loss(predict(w[:, :, :2]), w[:, :, 2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if k % max(args.steps // 5, 1) == 0:
            print(f"  step {k}/{args.steps}  loss {loss.item():.4f}  {time.time() - t0:.0f} s", flush=True)
    net.eval()
    mse, acc, labels = [], [], ref.labels.numpy()
    with torch.no_grad():
        given = ref.clips[:, :, :2]
        for f in range(2, ref.clips.shape[2]):
            pred = predict(given).clamp(-1, 1)
            mse.append(round(float((pred - ref.clips[:, :, f]).pow(2).mean()), 4))
            acc.append(round(float((ref.classifier.predict(pred) == labels).mean()), 3))
            given = torch.stack([given[:, :, 1], pred], 2)
    row = {"model": args.model, "overrides": args.overrides, "steps": args.steps,
           "train_seconds": round(time.time() - t0, 1), "params": sum(q.numel() for q in net.parameters()),
           "next_frame_mse": mse[0], "next_frame_accuracy": acc[0], "extended_mse": round(sum(mse) / len(mse), 4),
           "extended_accuracy": round(sum(acc) / len(acc), 3), "mse_per_frame": mse, "accuracy_per_frame": acc}
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
