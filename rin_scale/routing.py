"""Where the latents read and write: `python -m rin_scale.routing RUN_OR_SNAPSHOT --out routing.png`.

RIN's claim is adaptive computation: the latents read from the parts of the image that carry
information, and the allocation shifts over the noise levels of sampling. This module samples from
an EMA snapshot and records, at a few sampling steps (t near 0.9, 0.5, 0.1 by default), the
cross-attention of every block:

  read   queries = the latents (all of them: learned, time, class), keys = the interface tokens.
         The map is the read attention summed over latents and heads, divided by their number:
         the share of all read attention that lands on each token (sums to 1; uniform = 1/n).
  write  queries = the interface tokens, keys = the latents. Per token: the share of its attention
         on the time and class slots (`cond`, the default: where the model broadcasts the
         conditioning into the image), or the entropy of its attention over the latents divided
         by log(latents) (`entropy`: 1 = reads all latents evenly, 0 = reads one).

Why the time/class share is taken on *write*: on *read* the time and class tokens are queries, and
each query row of a softmax carries the same mass, so "the share of read attention of the time and
class slots" would be the constant (reserved slots / latents). On write the interface tokens query
the latents, and the mass they put on the time and class slots is a real measurement.

Scalars per block (`routing_scalars`, TensorBoard tags routing/<metric>/block<j>/t<t>):
  read_entropy   the entropy of each latent's (and head's) read over the interface tokens, averaged
                 and divided by log(tokens): 1 = uniform, low = focused
  read_top10     the share of read mass (the map above) on the 10% most-read tokens: 0.1 = uniform
  write_entropy  the write entropy map, averaged over tokens
  write_cond     the write time + class share, averaged over tokens (uniform: reserved / latents)

Recording costs nothing when off: `record_attention(model)` swaps the read and write attention
modules' forward for one that computes softmax(q k^T / sqrt(d)) explicitly and keeps only the
reductions above (O(tokens) per block and example), and puts the class's forward back on exit; no
attribute, hook or tensor is left on the model, and outside the context (or with `rec.on = False`)
the model runs its own SDPA call, bit for bit.

Video: tokens are 3-D patches over (t, h, w) of the whole clip (the given frames, then the
predicted ones); each map is drawn per token-frame, beside the first frame each token-frame covers.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
from contextlib import contextmanager
from typing import Optional, Sequence

import numpy as np
import torch
from einops import rearrange

AT = (0.9, 0.5, 0.1)  # the noise levels (sampling times t) recorded by default
TOP_FRACTION = 0.1  # read_top10: the share of read mass on this fraction of the tokens
WRITE_KINDS = ("cond", "entropy")


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of distributions along the last dim; 0 log 0 = 0."""
    return torch.special.entr(p).sum(-1)


class AttentionRecorder:
    """What `record_attention` yields. `records` holds one dict per model call made while `on`:
    {"read": [per block], "write": [per block], and, when sampled by `sample_with_routing`, "step",
    "t", "gamma", "x_t"}. Per block, all on the CPU in float32, B = the batch (or `keep`):
      read:  "map" (B, tokens): share of the read mass per token; "entropy" (B,): mean entropy of
             the rows over the tokens / log(tokens); "top10" (B,): share of "map" on the top 10%
      write: "entropy" (B, tokens): entropy over the latents / log(latents); "time", "class"
             (B, tokens): share of each token's attention on the time / class slot (class: zeros
             for unconditional models); "cond" = time + class
    """

    def __init__(self, num_blocks: int, num_latents: int, num_reserved: int, has_class: bool):
        self.on = True
        self.keep: Optional[int] = None  # record only the first `keep` examples (guidance doubles the batch)
        self.records: list[dict] = []
        self._nb, self._m, self._reserved, self._has_class = num_blocks, num_latents, num_reserved, has_class

    def _store(self, block: int, kind: str, p: torch.Tensor) -> None:
        """p: (B, heads, queries, keys) attention probabilities, float32."""
        if self.keep is not None:
            p = p[:self.keep]
        if kind == "read":
            if block == 0 or not self.records:
                self.records.append({"read": [None] * self._nb, "write": [None] * self._nb})
            n = p.shape[-1]
            share = p.mean((1, 2))  # (B, n), sums to 1 over the tokens
            k = max(1, round(TOP_FRACTION * n))
            rec = {"map": share, "entropy": _entropy(p).mean((1, 2)) / max(math.log(n), 1e-12),
                   "top10": share.topk(k, dim=-1).values.sum(-1)}
        else:
            m = p.shape[-1]
            time = p[..., m - self._reserved].mean(1)  # slots: learned latents, time, class
            cls = p[..., m - 1].mean(1) if self._has_class else torch.zeros_like(time)
            rec = {"entropy": _entropy(p).mean(1) / max(math.log(m), 1e-12), "time": time, "class": cls,
                   "cond": time + cls}
        self.records[-1][kind][block] = {k: v.detach().float().cpu() for k, v in rec.items()}


def _recording_forward(attn, rec: AttentionRecorder, block: int, kind: str):
    plain = type(attn).forward

    def forward(x, context):
        if not rec.on:
            return plain(attn, x, context)
        q, k, v = attn.project(x, context)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        p = scores.softmax(-1)  # what SDPA computes inside (its default scale 1/sqrt(head dim))
        rec._store(block, kind, p)
        o = torch.matmul(p, v.float()).to(v.dtype)
        return attn.out(rearrange(o, "b h n d -> b n (h d)"))

    return forward


@contextmanager
def record_attention(model):
    """Record the read and write attention of every block of a RIN (or a wrapper around one) while
    the context is open; yields an AttentionRecorder (`rec.on = False` pauses recording: the model
    then runs its own forward). On exit the modules are as they were."""
    net = _unwrap(model)
    hooked = []
    rec = AttentionRecorder(len(net.blocks), net.cfg.num_latents, net.num_reserved, net.class_emb is not None)
    try:
        for j, block in enumerate(net.blocks):
            for kind, cross in (("read", block.read), ("write", block.write)):
                attn = cross.attn
                if "forward" in vars(attn):
                    raise RuntimeError("record_attention: this model is already being recorded")
                attn.forward = _recording_forward(attn, rec, j, kind)
                hooked.append(attn)
        yield rec
    finally:
        for attn in hooked:
            del attn.forward


# --------------------------------------------------------------------------------------------
# Sampling with recording


def step_indices(at: Sequence[float], steps: int) -> list[int]:
    """The sampler steps whose t_now = 1 - i / steps is nearest each t in `at` (unique, in order)."""
    out = []
    for t in at:
        i = min(steps - 1, max(0, round((1.0 - float(t)) * steps)))
        if i not in out:
            out.append(i)
    return sorted(out)


@torch.no_grad()
def sample_with_routing(model, noise, dcfg, labels=None, cond=None, at: Sequence[float] = AT, steps=None,
                        sampler=None, guidance=None, generator=None, keep: Optional[int] = None):
    """(samples in [-1, 1] on the CPU, records): rin_scale.diffusion.sample from `noise`, recording
    the attention at the steps nearest the times in `at` (only those steps pay for it; the others
    run the model's own SDPA). With guidance, the conditional half is recorded. Each record also
    has "step", "t", "gamma" and "x_t" (the network's input at that step, on the CPU; video: the
    whole clip, the given frames scaled by the input scale, then the noisy ones). `keep`: record the
    first `keep` examples only (the trainer's preview samples its whole grid in this one pass)."""
    from .diffusion import sample

    net = _unwrap(model)
    steps = int(steps or dcfg.sample_steps)
    want = set(step_indices(at, steps))
    b = min(keep or noise.shape[0], noise.shape[0])

    with record_attention(net) as rec:
        rec.keep = b

        class Traced:  # what sample() calls each step; _unwrap(Traced()) is the model
            module = net
            calls = 0

            def __call__(self, x_t, gamma, labels_, latents, cond_):
                i = Traced.calls
                Traced.calls += 1
                rec.on = i in want
                out = net(x_t, gamma, labels_, latents, cond_)
                if rec.on:
                    clip = x_t[:b].float()
                    if cond_ is not None and net.cfg.is_video and not net.cfg.stacks_given:
                        clip = torch.cat([cond_[:b].float(), clip], dim=2)  # the frames the tokens cover
                    rec.records[-1].update(step=i, t=1.0 - i / steps, gamma=float(gamma[0]), x_t=clip.cpu())
                    rec.on = False
                return out

        x = sample(Traced(), noise.shape, dcfg, labels=labels, cond=cond, steps=steps, sampler=sampler,
                   noise=noise, generator=generator, guidance=guidance)
    return x.float().cpu(), rec.records


def routing_scalars(records: list[dict], prefix: str = "routing") -> dict:
    """{tag: float} per recorded step and block, averaged over the examples: read_entropy,
    read_top10, write_entropy, write_cond (see the module docstring). Tags:
    PREFIX/<metric>/block<j>/t<t:.2f> (or /call<k> for records made outside sample_with_routing)."""
    out = {}
    for k, r in enumerate(records):
        when = f"t{r['t']:.2f}" if r.get("t") is not None else f"call{k}"
        for j, (rd, wr) in enumerate(zip(r["read"], r["write"])):
            if rd is not None:
                out[f"{prefix}/read_entropy/block{j}/{when}"] = float(rd["entropy"].mean())
                out[f"{prefix}/read_top10/block{j}/{when}"] = float(rd["top10"].mean())
            if wr is not None:
                out[f"{prefix}/write_entropy/block{j}/{when}"] = float(wr["entropy"].mean())
                out[f"{prefix}/write_cond/block{j}/{when}"] = float(wr["cond"].mean())
    return out


# --------------------------------------------------------------------------------------------
# Drawing (PIL + numpy; no matplotlib)

# matplotlib's "inferno" at 0, 1/8, ..., 1 (dark = little attention, bright = much)
_INFERNO = np.array([(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85), (227, 89, 51),
                     (249, 140, 10), (249, 201, 50), (252, 255, 164)], dtype=np.float64)
LABEL_H = 12
GAP, GROUP_GAP = 2, 8


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (..., 3) on the inferno scale."""
    v = np.clip(np.nan_to_num(v), 0, 1) * (len(_INFERNO) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_INFERNO) - 2)
    f = (v - lo)[..., None]
    return (_INFERNO[lo] * (1 - f) + _INFERNO[lo + 1] * f).round().astype(np.uint8)


def token_grid(mcfg, values: torch.Tensor) -> np.ndarray:
    """(tokens,) -> (token-frames, g, g): images have one token-frame; video tokens are (t, h, w)."""
    g = mcfg.image_size // mcfg.patch_size
    tf = mcfg.token_frames // mcfg.patch_frames if mcfg.is_video else 1
    return values.reshape(tf, g, g).numpy()


def _heat(grid: np.ndarray, size: int) -> list[np.ndarray]:
    """(T', g, g) -> T' panels (size, size, 3), one colour scale across the T' frames (min to max)."""
    from PIL import Image

    lo, hi = float(grid.min()), float(grid.max())
    norm = (grid - lo) / (hi - lo) if hi > lo else np.zeros_like(grid)
    return [np.asarray(Image.fromarray(colormap(f)).resize((size, size), Image.NEAREST)) for f in norm]


def _picture(x: torch.Tensor, size: int) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (size, size, 3) uint8: nearest when enlarged, area-averaged when shrunk."""
    from PIL import Image

    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    arr = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr[..., :3]
    img = Image.fromarray(np.ascontiguousarray(arr))
    if img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST if size >= img.size[0] else Image.BOX)
    return np.asarray(img)


def _frames(mcfg, clip: torch.Tensor, size: int) -> list[np.ndarray]:
    """One picture per token-frame: an image, or the first frame each token-frame of a clip covers."""
    if not mcfg.is_video:
        return [_picture(clip, size)]
    return [_picture(clip[:, k], size) for k in range(0, clip.shape[1], mcfg.patch_frames)]


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _fit(draw, text: str, width: int, font) -> str:
    while text and draw.textlength(text, font=font) > width - 2:
        text = text[:-1]
    return text


def render(mcfg, samples: torch.Tensor, records: list[dict], cond: Optional[torch.Tensor] = None,
           write: str = "cond", panel: Optional[int] = None, legend: bool = True, labels=None) -> np.ndarray:
    """(H, W, 3) uint8: for each example and recorded step, the network's input x_t, the final
    sample, then per block the read map and the write map (`write`: "cond" or "entropy"), each
    panel labelled; images in one row, video one row per item with a panel per token-frame."""
    from PIL import Image, ImageDraw

    if write not in WRITE_KINDS:
        raise ValueError(f"write={write!r}: use one of {', '.join(WRITE_KINDS)}")
    size = panel or min(max(mcfg.image_size, 64), 256)
    final = torch.cat([cond.float().cpu(), samples], dim=2) if mcfg.is_video and cond is not None else samples
    rows: list[list[tuple[str, np.ndarray]]] = []  # panels with their labels
    breaks: list[int] = []  # the rows after which a wider gap separates examples
    for e in range(samples.shape[0]):
        for r in records:
            items = []  # (label of the first panel, [panels])
            t = r.get("t")
            if "x_t" in r:  # recorded by sample_with_routing
                items.append((f"x_t, t={t:.2f}" if t is not None else "x_t", _frames(mcfg, r["x_t"][e], size)))
            name = f"sample c{int(labels[e])}" if labels is not None and int(labels[e]) >= 0 else "sample"
            items.append((name, _frames(mcfg, final[e], size)))
            for j, rd in enumerate(r["read"]):
                items.append((f"read{j}: {float(rd['top10'][e]):.2f}", _heat(token_grid(mcfg, rd["map"][e]), size)))
            for j, wr in enumerate(r["write"]):
                v = wr[write][e]
                items.append((f"write{j}: {float(v.mean()):.2f}", _heat(token_grid(mcfg, v), size)))
            if mcfg.is_video:
                for label, panels in items:
                    rows.append([(label if k == 0 else f"f{k * mcfg.patch_frames}", p) for k, p in enumerate(panels)])
            else:
                rows.append([(label, panels[0]) for label, panels in items])
        breaks.append(len(rows) - 1)

    font = _font()
    cols = max(len(row) for row in rows)
    width = cols * (size + GAP) + GAP
    cell_h = LABEL_H + size
    lines = []
    if legend:
        what = ("share of each token's attention on the time+class slots (label: mean)" if write == "cond"
                else "entropy of each token's attention over the latents / log(latents) (label: mean)")
        lines = ["x_t: network input at sampling time t; sample: the final sample",
                 "read j: read attention on each token, summed over latents and heads (label: share on the top 10%)",
                 f"write j: {what}", "each map is scaled from its own min (dark) to its max (bright)"]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = []
    for line in lines:  # wrap the legend at the image width
        words, cur = line.split(" "), ""
        for w in words:
            cand = f"{cur} {w}".strip()
            if cur and probe.textlength(cand, font=font) > width - 4:
                wrapped.append(cur)
                cur = w
            else:
                cur = cand
        wrapped.append(cur)
    top = len(wrapped) * LABEL_H + (GAP if wrapped else 0)
    height = top + len(rows) * (cell_h + GAP) + (len(breaks) - 1) * (GROUP_GAP - GAP) + GAP
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(wrapped):
        draw.text((2, i * LABEL_H), line, fill=(0, 0, 0), font=font)
    y = top + GAP
    for ri, row in enumerate(rows):
        for ci, (label, p) in enumerate(row):
            x = GAP + ci * (size + GAP)
            draw.text((x + 1, y), _fit(draw, label, size, font), fill=(0, 0, 0), font=font)
            img.paste(Image.fromarray(p), (x, y + LABEL_H))
        y += cell_h + (GROUP_GAP if ri in breaks else GAP)
    return np.asarray(img)


def routing_image(model, noise, dcfg, labels=None, cond=None, *, at: Sequence[float] = AT, steps=None,
                  sampler=None, guidance=None, generator=None, write: str = "cond", panel: Optional[int] = None,
                  records: Optional[list] = None) -> torch.Tensor:
    """A (3, H, W) image in [0, 1] for TensorBoard: sample from `noise` (B, *sample_shape) with
    `labels` / `cond` as rin_scale.diffusion.sample takes them, record the attention at the times
    `at`, draw `render`. Pass a list as `records` to get the records too (for routing_scalars)
    without sampling again."""
    net = _unwrap(model)
    x, recs = sample_with_routing(net, noise, dcfg, labels, cond, at, steps, sampler, guidance, generator)
    if records is not None:
        records.extend(recs)
    arr = render(net.cfg, x, recs, cond=cond, write=write, panel=panel, labels=labels)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


# --------------------------------------------------------------------------------------------
# CLI


def _table(records: list[dict]) -> str:
    head = f"{'t':>5} {'block':>5} {'read_entropy':>12} {'read_top10':>10} {'write_entropy':>13} " \
           f"{'write_time':>10} {'write_class':>11}"
    lines = [head]
    for r in records:
        for j, (rd, wr) in enumerate(zip(r["read"], r["write"])):
            lines.append(f"{r.get('t', float('nan')):5.2f} {j:5d} {float(rd['entropy'].mean()):12.3f} "
                         f"{float(rd['top10'].mean()):10.3f} {float(wr['entropy'].mean()):13.3f} "
                         f"{float(wr['time'].mean()):10.3f} {float(wr['class'].mean()):11.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from PIL import Image

    from . import rundir, storage
    from .config import ConfigError
    from .data import DataError, leading_frames
    from .sample import resolve_snapshot

    p = argparse.ArgumentParser(prog="python -m rin_scale.routing", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="snapshot folder or run directory (its newest complete snapshot; any fsspec URL)")
    p.add_argument("--out", default="routing.png", help="PNG to write")
    p.add_argument("--class", dest="label", type=int, default=None, help="condition every example on this class")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the snapshot's config)")
    p.add_argument("--at", default=",".join(str(t) for t in AT), help="sampling times t to record, comma-separated")
    p.add_argument("--n", type=int, default=2, help="examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight w")
    p.add_argument("--write", choices=WRITE_KINDS, default="cond",
                   help="write map: share on the time+class slots (cond) or entropy over the latents")
    p.add_argument("--panel", type=int, default=0, help="panel size in pixels (default: the image size, 64 to 256)")
    p.add_argument("--data", default="", help="video: shards whose clips give the conditioning frames")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    try:
        at = [float(s) for s in a.at.split(",") if s.strip()]
        if not at or not all(0.0 <= t <= 1.0 for t in at):
            raise ConfigError(f"--at {a.at!r}: give sampling times in [0, 1], e.g. 0.9,0.5,0.1")
        snap, run = resolve_snapshot(a.source)
        model, dcfg, meta = rundir.load_snapshot_model(snap, device=a.device)
        m = model.cfg
        if a.label is not None and not 0 <= a.label < m.num_classes:
            raise ConfigError(f"--class {a.label}: the model has {m.num_classes} classes (0..{m.num_classes - 1})")
        labels = None
        if m.num_classes:
            labels = torch.full((a.n,), a.label) if a.label is not None else torch.arange(a.n) % m.num_classes
        cond = None
        if m.is_video and m.cond_frames:
            data = a.data or (rundir.load_run_config(run).data.shards if run else "")
            if not data:
                raise ConfigError("a video snapshot needs conditioning frames: pass --data SHARDS")
            cond = leading_frames(data, m, a.n)
    except (ConfigError, DataError, rundir.SnapshotError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = int(a.steps or dcfg.sample_steps)
    print(f"[routing] {snap} (step {meta.get('step')}): {a.n} examples, {steps} steps, recording at t = "
          + ", ".join(f"{1 - i / steps:.2f}" for i in step_indices(at, steps)), file=sys.stderr)
    gen = torch.Generator(a.device).manual_seed(a.seed)
    noise = torch.randn((a.n, *m.sample_shape), generator=gen, device=a.device)
    x, records = sample_with_routing(model, noise, dcfg, labels.to(a.device) if labels is not None else None,
                                     cond.to(a.device) if cond is not None else None, at, steps, a.sampler,
                                     a.guidance, gen)
    arr = render(m, x, records, cond=cond, write=a.write, panel=a.panel or None, labels=labels)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    fs, path = storage.fs_path(a.out)
    fs.pipe_file(path, buf.getvalue())
    print(_table(records))
    print(f"[routing] {arr.shape[1]}x{arr.shape[0]} -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
