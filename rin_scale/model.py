"""The Recurrent Interface Network (Jabri, Fleet, Chen 2023), built to shared/RIN_SPEC.md.

Plain torch.nn: no DeepSpeed, no storage. All attention goes through
`F.scaled_dot_product_attention`, so GPUs get the fused (flash / memory-efficient) kernels and the
CPU its own fused path.

    model = RIN(cfg.model)
    out, latents = model(x_t, gamma, labels=None, prev_latents=None, cond=None)
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import ConfigError, ModelConfig, conv_groups

LN_EPS = 1e-6  # as in the authors' code


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


class DropPath(nn.Module):
    """Stochastic depth on a residual branch, per example."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)


_DROP_GRID = 1 << 16  # the CPU dropout's rate is a multiple of 2^-16


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout, as F.dropout: each element is kept with probability 1 - p and scaled by
    1 / (1 - p). GPUs run F.dropout itself. On the CPU, F.dropout's mask (bernoulli_) draws a
    64-bit double from the generator per element, serially, and cost 5-20% of a cifar10
    forward+backward; here each element takes 16 random bits (four per 64-bit draw, same
    generator, so torch.manual_seed still makes it reproducible), with p rounded to a multiple of
    2^-16 (0.1 -> 0.1000061) and the scale taken from that rounded p, so the output is unbiased."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    drop = round(p * _DROP_GRID)
    if drop == 0 or drop >= _DROP_GRID:  # p below 2^-17 or above 1 - 2^-17: F.dropout's own draw
        return F.dropout(x, p, True)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)
    r = bits.view(torch.int16)[:n].view(x.shape)  # uniform on [-2^15, 2^15)
    keep = (r >= drop - _DROP_GRID // 2).view(torch.uint8)  # uint8 -> float is vectorized, bool not
    return x * keep.to(x.dtype).mul_(_DROP_GRID / (_DROP_GRID - drop))


class Dropout(nn.Module):
    """nn.Dropout through `dropout` (the cheaper CPU mask)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """Residual pre-LN GELU MLP: x + drop_path(fc2(dropout(gelu(fc1(LN(x)))))); dropout once, on
    the hidden layer, as the authors' MLP."""

    def __init__(self, dim: int, ratio: float, dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.norm = layer_norm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        return x + self.drop_path(self.fc2(self.dropout(F.gelu(self.fc1(self.norm(x))))))


# On the CPU, SDPA's bf16 flash kernel is slower than its fp32 one for short sequences, and both
# are slower than the attention written out in bf16 (two matmuls and a softmax, oneDNN's bf16
# GEMMs): forward + backward of a cifar10 block's attention, bf16 flash / fp32 flash / explicit
# bf16: 37 / 19 / 10 ms for the latents' self-attention, 26 / 14 / 8 ms for the write (AVX-512-BF16
# EPYC, 2 threads); 10% of a cifar10 bf16 forward+backward. The explicit form keeps the probabilities
# for the backward (2 bytes per score), where flash keeps one number per query: so only up to this
# many score entries per head (imagenet1024's latents, not its 16,384-token read and write).
CPU_MATH_ATTENTION_MAX = 1 << 20


def attend(q, k, v):
    """softmax(q k^T / sqrt(head_dim)) v, by F.scaled_dot_product_attention; short bf16 attention on
    the CPU written out instead, rounded as the usual bf16 "eager" attention (Hugging Face's): scores
    and probabilities in bf16, the softmax itself computed in fp32 (torch's CPU bf16 softmax does).
    GPU flash keeps the scores in fp32."""
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16
            and q.shape[-2] * k.shape[-2] <= CPU_MATH_ATTENTION_MAX):
        return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), -1) @ v  # all bf16, autocast or not
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head attention of queries (width q_dim) over a context (width kv_dim) via SDPA.

    Only the queries are LayerNormed (by the caller's `norm`): for cross-attention the keys and
    values are the other stream as it is, as in the paper (ports that normalized them diverge).
    No dropout on the attention probabilities (the authors' drop_att=0), which also keeps SDPA on
    its fused kernels (flash on GPUs).
    """

    def __init__(self, q_dim: int, kv_dim: int, inner: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(q_dim, inner)
        self.kv = nn.Linear(kv_dim, 2 * inner)
        self.out = nn.Linear(inner, q_dim)

    def project(self, x, context):
        """(q, k, v), each (B, heads, N, head_dim). rin_scale.routing.record_attention computes
        softmax(q k^T / sqrt(head_dim)) from these explicitly, to record it; forward never does."""
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(context), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        return q, k, v

    def forward(self, x, context):
        q, k, v = self.project(x, context)
        return self.out(rearrange(attend(q, k, v), "b h n d -> b n (h d)"))


class CrossAttend(nn.Module):
    """x + Attn(LN(x), context): queries normalized, keys/values (context) not."""

    def __init__(self, q_dim: int, kv_dim: int, heads: int):
        super().__init__()
        self.norm = layer_norm(q_dim)
        self.attn = Attention(q_dim, kv_dim, min(q_dim, kv_dim), heads)

    def forward(self, x, context):
        return x + self.attn(self.norm(x), context)


class SelfAttend(nn.Module):
    """A pre-LN transformer layer on the latents; dropout and drop-path live here only."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, drop_path: float):
        super().__init__()
        self.norm = layer_norm(dim)
        self.attn = Attention(dim, dim, dim, heads)
        self.drop_path = DropPath(drop_path)
        self.mlp = MLP(dim, mlp_ratio, dropout, drop_path)

    def forward(self, z):
        h = self.norm(z)
        z = z + self.drop_path(self.attn(h, h))
        return self.mlp(z)


class TokenConv(nn.Module):
    """The authors' optional conv unit on the interface after each write (their DepthwiseConvBlock,
    `conv_kernel_size`; off in their configs): x + pointwise(SiLU(GroupNorm(depthwise(x)))) over
    the token grid, the pointwise conv starting at zero (theirs at scale 1e-10), so the block
    starts as the identity. Read and write treat the interface tokens independently; this is their
    only exchange with their neighbours except through the latents. Video: a 3-D kernel over
    (T', H', W') (an extension: their conv is 2-D), or 2-D when T' = 1 (cond_mode=channels): the
    same maths, and on the CPU the 3-D depthwise backward took 3 ms against the 2-D 0.35 ms
    (tiny_video, per block; ~13% of its step). Runs in fp32 under bf16 autocast: it costs
    little, and with bf16 kernels on the CPU tiny_video's gradient norm was inf or ~1e16 on a
    third of its first steps on 2 ranks (finite in fp32, and on 1 rank)."""

    def __init__(self, dim: int, kernel: int, grid: tuple[int, ...]):
        super().__init__()
        if len(grid) == 3 and grid[0] == 1:
            grid = grid[1:]
        conv = nn.Conv3d if len(grid) == 3 else nn.Conv2d
        self.grid = grid
        self.depthwise = conv(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.GroupNorm(conv_groups(dim), dim, eps=LN_EPS)
        self.pointwise = conv(dim, dim, 1)

    def forward(self, x):
        # contiguous: CPU GroupNorm is several times slower on the channels-last layout the transpose gives
        h = rearrange(x, "b n d -> b d n").float().contiguous().view(x.shape[0], x.shape[2], *self.grid)
        with torch.autocast(x.device.type, enabled=False) if x.device.type != "meta" else contextlib.nullcontext():
            h = self.pointwise(F.silu(self.norm(self.depthwise(h))))
        return x + rearrange(h.flatten(2), "b d n -> b n d").to(x.dtype)

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        # Snapshots from before one-frame grids took a 2-D conv hold 3-D kernels over that one
        # frame; with zero padding only their middle time slice ever touched a token.
        if len(self.grid) == 2:
            for name in ("depthwise.weight", "pointwise.weight"):
                w = state.get(prefix + name)
                if w is not None and w.dim() == 5:
                    state[prefix + name] = w[:, :, w.shape[2] // 2]
        super()._load_from_state_dict(state, prefix, *args, **kwargs)


class Block(nn.Module):
    """read (latents attend to the interface, then an MLP on the latents) -> compute (k layers on
    the latents) -> write (interface attends to the latents, then an MLP on the interface) -> the
    interface conv when model.conv_kernel_size > 0."""

    def __init__(self, m: ModelConfig, drop_paths: list[float], grid: tuple[int, ...]):
        super().__init__()
        d, dl = m.interface_dim, m.latent_dim
        self.read = CrossAttend(dl, d, m.read_write_heads)
        self.read_mlp = MLP(dl, m.latent_mlp_ratio)
        self.compute = nn.ModuleList(
            SelfAttend(dl, m.latent_heads, m.latent_mlp_ratio, m.dropout, p) for p in drop_paths)
        self.write = CrossAttend(d, dl, m.read_write_heads)
        self.write_mlp = MLP(d, m.interface_mlp_ratio) if m.interface_mlp_ratio > 0 else nn.Identity()
        self.conv = TokenConv(d, m.conv_kernel_size, grid) if m.conv_kernel_size else None

    def forward(self, x, z):
        z = self.compute_step(self.read_step(x, z))
        x = self.write_step(x, z)
        return (self.conv_step(x) if self.conv is not None else x), z

    # The stages, each a function of tensors, so that activation checkpointing can save
    # only their inputs (forward_segments).

    def read_step(self, x, z):
        return self.read_mlp(self.read(z, x))

    def compute_step(self, z):
        for layer in self.compute:
            z = layer(z)
        return z

    def write_step(self, x, z):
        return self.write_mlp(self.write(x, z))

    def conv_step(self, x):
        return self.conv(x)

    def forward_segments(self, x, z, checkpoint: Optional[Callable], chunk_tokens: int = 0):
        """forward(), with read, compute and write each run through `checkpoint` (which saves a
        stage's inputs and recomputes it in the backward pass): every stage is recomputed once,
        as when the whole block is checkpointed, but the backward pass holds the activations of
        one stage at a time instead of the whole block's. The write (cross-attention of each
        interface token over the latents, then the interface MLP) treats the tokens
        independently, so with chunk_tokens > 0 it runs in chunks of that many tokens, each
        checkpointed: the interface's activations (16,384 tokens at 1024x1024) are then held one
        chunk at a time, also in a no-grad pass (checkpoint None: chunks only). Same maths as
        forward(), up to float rounding in the chunked products. The interface conv, which mixes
        neighbouring tokens, runs after the chunks are joined, checkpointed as a fourth stage."""
        run = checkpoint or (lambda fn, *args: fn(*args))
        z = run(self.read_step, x, z)
        z = run(self.compute_step, z)
        if 0 < chunk_tokens < x.shape[1]:
            x = torch.cat([run(self.write_step, xc, z) for xc in x.split(chunk_tokens, dim=1)], dim=1)
        else:
            x = run(self.write_step, x, z)
        return (run(self.conv_step, x) if self.conv is not None else x), z


def sinusoidal(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of scalars (B,) -> (B, dim), normalized to zero mean and unit std per
    example (population std) as in the authors' ScalarEmbedding(normalize=True)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    ang = values.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    return (emb - emb.mean(-1, keepdim=True)) / (emb.std(-1, keepdim=True, correction=0) + 1e-6)


def sin_cos_2d(rows: int, cols: int, dim: int, scale: float = 1e4) -> torch.Tensor:
    """(rows * cols, dim) fixed position codes, as the authors' get_2d_position_codes with their
    normalization_max = time_scaling = 1e4: the first dim / 2 channels code the row, the rest the
    column; each coordinate is scaled to [0, scale], then sin on even and cos on odd frequencies."""
    def codes(n):
        c = torch.arange(n, dtype=torch.float64) / max(n - 1, 1) * scale
        i = torch.arange(dim // 2)
        ang = c[:, None] / 10000.0 ** (2 * (i // 2) / (dim // 2))
        return torch.cat([ang[:, 0::2].sin(), ang[:, 1::2].cos()], -1)
    y, x = codes(rows), codes(cols)
    return torch.cat([y[:, None].expand(rows, cols, -1), x[None].expand(rows, cols, -1)], -1).reshape(-1, dim).float()


class RIN(nn.Module):
    """Recurrent Interface Network over images (B,C,H,W) or frame-conditioned video (B,C,T,H,W).

    Latent slots: `num_latents` in all = learned latents + 1 time token (+ 1 class token when
    num_classes > 0). The time token embeds gamma = alpha_bar(t), never t.

    Video: the clean conditioning frames and the noisy frames are concatenated along time into the
    whole clip and tokenized by one 3-D stem, so patch_frames need only divide the clip length
    (kinetics600: 5 + 11 = 16 frames, 2x4x4 patches -> 2,048 tokens, although 5 and 11 are odd).
    A 3-D patch may therefore straddle the last clean and the first noisy frame; the learned
    positional embedding of each token already tells the network which frames it covers (clean
    frames always come first), so no separate clean/noisy embedding is added. The readout
    decodes the whole clip and the output for the predicted frames is returned; the loss is
    taken on those only, so the conditioning frames are read and written but never a target.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = m = cfg
        if m.is_video and m.token_frames % m.patch_frames:
            raise ConfigError(f"model.patch_frames={m.patch_frames} does not divide {m.token_frames} frames")
        if m.image_size % m.patch_size:
            raise ConfigError(f"model.patch_size={m.patch_size} does not divide model.image_size={m.image_size}")
        d, dl = m.interface_dim, m.latent_dim
        p, pt = m.patch_size, m.patch_frames
        side = m.image_size // p
        grid = side * side
        if m.is_video:
            c_in = m.channels * (1 + m.cond_frames) if m.stacks_given else m.channels
            self.stem = nn.Conv3d(c_in, d, (pt, p, p), stride=(pt, p, p))
            self.num_tokens = grid * (m.token_frames // pt)
            self.patch_dim = m.channels * pt * p * p
        else:
            self.stem = nn.Conv2d(m.channels, d, p, stride=p)
            self.num_tokens = grid
            self.patch_dim = m.channels * p * p
        self.stem_norm = layer_norm(d)
        # model.pos_encoding: "learned" (trunc normal 0.02), or the authors' "sin_cos_plus_learned":
        # fixed 2-D codes (repeated over time for video; not saved, rebuilt) + a learned residual from 0
        self.pos_emb = nn.Parameter(torch.empty(1, self.num_tokens, d))
        if m.pos_encoding == "sin_cos_plus_learned":
            fixed = sin_cos_2d(m.image_size // p, m.image_size // p, d).repeat(self.num_tokens // grid, 1)
            self.register_buffer("pos_fixed", fixed[None], persistent=False)
        elif m.pos_encoding != "learned":
            raise ConfigError(f"model.pos_encoding={m.pos_encoding!r} is not one of learned, sin_cos_plus_learned")

        self.num_reserved = 1 + (1 if m.num_classes > 0 else 0)
        self.latent_init = nn.Parameter(torch.empty(1, m.num_latents - self.num_reserved, dl))
        self.time_features = max(dl // 4, 2)  # as the authors: sinusoid of d'/4, Dense(d') SiLU Dense(d')
        self.time_mlp = nn.Sequential(nn.Linear(self.time_features, dl), nn.SiLU(), nn.Linear(dl, dl))
        # Row num_classes is "no label" (classifier-free guidance); an embedding = one-hot -> Dense.
        self.class_emb = nn.Embedding(m.num_classes + 1, dl) if m.num_classes > 0 else None

        # Warm start: Z = Z_init + LN(Z' + MLP(Z')), LN scale and bias zero, so Z = Z_init at init.
        self.prev_mlp = MLP(dl, m.latent_mlp_ratio)
        self.prev_norm = layer_norm(dl)

        # drop-path: the same rate on every latent layer, as the authors (no ramp over depth)
        token_grid = (self.num_tokens // grid, side, side) if m.is_video else (side, side)
        self.blocks = nn.ModuleList(Block(m, [m.drop_path] * m.latent_layers, token_grid)
                                    for _ in range(m.num_blocks))
        self.out_norm = layer_norm(d)
        self.readout = nn.Linear(d, self.patch_dim)

        # Activation checkpointing hook, set by the trainer (keeps DeepSpeed out of the model):
        # checkpoint_fn(block, x, z) runs every checkpoint_every-th block (rin_scale.engine's runs
        # it stage by stage: Block.forward_segments).
        self.checkpoint_fn: Optional[Callable] = None
        self.checkpoint_every = 1
        self.reset_parameters()

    def reset_parameters(self):
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                nn.init.xavier_uniform_(mod.weight.view(mod.weight.shape[0], -1))
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):  # the class token: one-hot -> Dense, initialized as a Dense
                nn.init.xavier_uniform_(mod.weight)
        if self.cfg.pos_encoding == "learned":
            nn.init.trunc_normal_(self.pos_emb, std=0.02)
        else:
            nn.init.zeros_(self.pos_emb)
        nn.init.trunc_normal_(self.latent_init, std=0.02)
        nn.init.zeros_(self.prev_norm.weight)
        nn.init.zeros_(self.prev_norm.bias)
        for block in self.blocks:
            if block.conv is not None:
                nn.init.zeros_(block.conv.pointwise.weight)
        # model.rw_out_init: "glorot" (the authors' code; the LAMB presets) keeps the Glorot output
        # projections of read and write set above. "zero" starts read and write as identities: under
        # AdamW (tiny) the first read otherwise adds interface features of norm ~sqrt(d) to latents
        # of norm ~0.3, the time and class tokens drown, and conditioning is learned very late (tiny
        # on digits: 89% class accuracy after 1,200 steps with zero, 16% with Glorot). Under LAMB a
        # zero tensor grows by at most a factor (1 + lr) a step once it is non-zero, so zero output
        # projections stay near zero for most of the warmup (bench/recipe_init.py).
        if self.cfg.rw_out_init == "zero":
            for block in self.blocks:
                for cross in (block.read, block.write):
                    nn.init.zeros_(cross.attn.out.weight)
        elif self.cfg.rw_out_init != "glorot":
            raise ConfigError(f"model.rw_out_init={self.cfg.rw_out_init!r} is not one of zero, glorot")

    def no_decay_param_names(self) -> set[str]:
        """Biases, LayerNorm weights and embeddings (positional, latent, class): no weight decay
        when train.no_decay_embeddings; otherwise (the authors) only trust_ratio_exempt_names()."""
        names = self.trust_ratio_exempt_names()
        for mname, mod in self.named_modules():
            if isinstance(mod, nn.Embedding) or mod is self:
                names |= {f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(recurse=False)}
        return names

    def trust_ratio_exempt_names(self) -> set[str]:
        """Biases and norm (LayerNorm, GroupNorm) scales and offsets: LAMB takes a plain step on these
        (trust ratio 1) and never decays them, as the authors' exclude_from_layer_adaptation /
        _weight_decay (["layer_norm", "bias"]). Embeddings are neither: they get the trust ratio and
        decay."""
        names = set()
        for mname, mod in self.named_modules():
            for pname, _ in mod.named_parameters(recurse=False):
                if pname == "bias" or isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
                    names.add(f"{mname}.{pname}" if mname else pname)
        return names

    # ---------------------------------------------------------------------------------------

    def stem_input(self, x_t, cond=None):
        """What the stem tokenizes: x_t, or for video with given frames the clip (cond_mode=time) or the
        predicted frames with the given ones stacked onto their channels (cond_mode=channels)."""
        m = self.cfg
        clip = x_t
        if m.stacks_given:
            given = rearrange(cond.to(x_t.dtype), "b c t h w -> b (t c) h w")[:, :, None]
            clip = torch.cat([x_t, given.expand(-1, -1, m.pred_frames, -1, -1)], dim=1)
        elif m.is_video and m.cond_frames:
            clip = torch.cat([cond.to(x_t.dtype), x_t], dim=2)
        return clip.to(self.stem.weight.dtype)  # bf16 models take fp32 inputs too

    def tokenize(self, x):
        tokens = self.stem(x)  # (B, d, [T',] H', W')
        tokens = rearrange(tokens, "b d ... -> b (...) d")
        tokens = self.stem_norm(tokens) + self.pos_emb
        return tokens + self.pos_fixed if self.cfg.pos_encoding != "learned" else tokens

    def untokenize(self, tokens):
        m = self.cfg
        p, g = m.patch_size, m.image_size // m.patch_size
        patches = self.readout(self.out_norm(tokens))
        if m.is_video:
            return rearrange(patches, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)",
                             t=m.token_frames // m.patch_frames, h=g, w=g, pt=m.patch_frames, ph=p, pw=p)
        return rearrange(patches, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=g, w=g, ph=p, pw=p)

    def initial_latents(self, gamma, labels, prev_latents):
        """Z = [learned latents, time token, class token] + LN(Z' + MLP(Z')), Z' = 0 when None."""
        b = gamma.shape[0]
        dtype = self.latent_init.dtype
        time = self.time_mlp(sinusoidal(gamma * 1000.0, self.time_features).to(dtype))
        tokens = [self.latent_init.expand(b, -1, -1), time[:, None]]
        if self.class_emb is not None:
            if labels is None:
                labels = torch.full((b,), self.cfg.num_classes, dtype=torch.long, device=gamma.device)
            # -1 (unlabelled, from the data pipeline) also means "no label".
            labels = torch.where(labels < 0, torch.full_like(labels, self.cfg.num_classes), labels)
            tokens.append(self.class_emb(labels)[:, None])
        z_init = torch.cat(tokens, dim=1)
        if prev_latents is None:
            prev_latents = torch.zeros_like(z_init)
        return z_init + self.prev_norm(self.prev_mlp(prev_latents.to(z_init.dtype)))

    def forward(self, x_t, gamma, labels=None, prev_latents=None, cond=None):
        m = self.cfg
        b = x_t.shape[0]
        gamma = torch.as_tensor(gamma, device=x_t.device, dtype=torch.float32)
        if gamma.dim() == 0:
            gamma = gamma.expand(b)
        self._check_input(x_t, cond)
        x = self.tokenize(self.stem_input(x_t, cond))
        z = self.initial_latents(gamma, labels, prev_latents)
        for i, block in enumerate(self.blocks):
            if self.checkpoint_fn is not None and i % max(self.checkpoint_every, 1) == 0:
                x, z = self.checkpoint_fn(block, x, z)
            else:
                x, z = block(x, z)
        out = self.untokenize(x)
        if m.is_video and m.cond_frames and not m.stacks_given:
            out = out[:, :, m.cond_frames:]
        return out, z

    def _check_input(self, x_t, cond):
        m = self.cfg
        s = m.image_size
        if m.is_video:
            want = (m.channels, m.pred_frames, s, s)
            if tuple(x_t.shape[1:]) != want:
                raise ValueError(f"x_t has shape {tuple(x_t.shape)}; this video model takes (B, {m.channels}, "
                                 f"{m.pred_frames}, {s}, {s}) = the predicted frames only")
            if m.cond_frames:
                cwant = (x_t.shape[0], m.channels, m.cond_frames, s, s)
                if cond is None or tuple(cond.shape) != cwant:
                    got = None if cond is None else tuple(cond.shape)
                    raise ValueError(f"cond has shape {got}; pass the clean conditioning frames as {cwant}")
        elif tuple(x_t.shape[1:]) != (m.channels, s, s):
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; this image model takes (B, {m.channels}, {s}, {s})")
