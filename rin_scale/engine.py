"""DeepSpeed set-up: process group, precision, optimizer param groups, LR schedule, DS config.

    rank, world, local_rank = init_distributed()
    prec = choose_precision(cfg.train.precision, device)
    engine, opt, sched = build_engine(model, cfg, world, prec)
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import Config, ConfigError, check_world


# --------------------------------------------------------------------------------------------
# Processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / deepspeed / submitit env vars; a bare process
    becomes a world of one. DeepSpeed picks gloo on the CPU and NCCL on GPUs."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    return dist.get_rank(), dist.get_world_size(), local_rank


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Precision


@dataclass
class Precision:
    name: str  # "bf16" | "fp32"
    reason: str

    @property
    def dtype(self):
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def autocast(self, dev: torch.device):
        """bf16 compute with fp32 master weights (torch AMP). Used under every ZeRO stage: DeepSpeed's
        own bf16 block keeps bf16 weights without ZeRO and rejects stage 0 + fp32 accumulation."""
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.name == "bf16")


def choose_precision(setting: str, dev: torch.device, probe_seconds: float = 0.2) -> Precision:
    """'auto': bf16 on GPUs; on the CPU bf16 only when a matmul probe shows it clearly faster."""
    if setting == "fp32":
        return Precision("fp32", "asked for (train.precision=fp32)")
    if dev.type == "cuda":
        if setting == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision=bf16: this GPU has no bf16; use train.precision=fp32")
        ok = torch.cuda.is_bf16_supported()
        return Precision("bf16" if ok else "fp32", "GPU" + ("" if ok else " without bf16 support"))
    if setting == "bf16":
        return Precision("bf16", "asked for (train.precision=bf16)")
    from .perf import matmul_peak

    f32 = matmul_peak(torch.float32, dev, probe_seconds / 2)
    b16 = matmul_peak(torch.bfloat16, dev, probe_seconds / 2)
    if b16 > 1.3 * f32:
        return Precision("bf16", f"CPU bf16 matmul {b16 / 1e9:.0f} GFLOP/s vs fp32 {f32 / 1e9:.0f}")
    return Precision("fp32", f"CPU bf16 matmul not clearly faster ({b16 / 1e9:.0f} vs fp32 {f32 / 1e9:.0f} GFLOP/s)")


# --------------------------------------------------------------------------------------------
# Optimizers. Both skip a step whose gradients are not finite on any rank (all ranks agree), so a
# NaN batch never reaches the weights. `overflow` is DeepSpeed's name: without ZeRO the engine reads
# it to skip the LR step, as its ZeRO optimizers do for their own check, so that every stage
# treats a skipped step alike (engine.was_step_applied()). Both keep a per-group
# "step", which DeepSpeed's elastic ZeRO checkpoints need to re-partition for a new world size.


def _count_step(optimizer) -> None:
    for g in optimizer.param_groups:
        g["step"] = g.get("step", 0) + 1


def _all_finite(tensors) -> bool:
    bad = torch.zeros(1)
    for t in tensors:
        if not torch.isfinite(t).all():
            bad += 1
            break
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    return bad.item() == 0


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019): Adam direction plus decoupled decay, scaled per layer by the trust
    ratio ||w|| / ||update||. With `partitioned=True` (ZeRO), every param group must hold one
    parameter, of which this rank sees a slice: the norms are summed over all ranks so the trust
    ratio is that of the whole layer, exactly as without ZeRO."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, partitioned=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, step=0))
        self.partitioned = partitioned
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = not _all_finite(p.grad for p in params)
        if self.overflow:
            return None
        updates, norms = [], []
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                k = st["step"].item()
                grad = p.grad.float()
                st["exp_avg"].lerp_(grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                m_hat = st["exp_avg"] / (1 - b1 ** k)
                v_hat = st["exp_avg_sq"] / (1 - b2 ** k)
                u = m_hat / (v_hat.sqrt() + g["eps"])
                if g["weight_decay"]:
                    u.add_(p.float(), alpha=g["weight_decay"])
                updates.append((g, p, u))
                norms.append(torch.stack([p.float().pow(2).sum(), u.pow(2).sum()]))
        _count_step(self)
        if not updates:
            return None
        norms = torch.stack(norms)
        if self.partitioned and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(norms)
        norms = norms.sqrt()
        for (g, p, u), (wn, un) in zip(updates, norms):
            trust = (wn / un).item() if wn > 0 and un > 0 else 1.0
            p.add_(u.to(p.dtype), alpha=-g["lr"] * trust)
        return None


class AdamW(torch.optim.AdamW):
    """torch's AdamW that skips a step with non-finite gradients on any rank."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.overflow = False
        for g in self.param_groups:
            g.setdefault("step", 0)

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = not _all_finite(grads)
        if self.overflow:
            return None
        _count_step(self)
        return super().step(closure)


def param_groups(model, cfg: Config, one_per_param: bool) -> list[dict]:
    """Weight decay off for the model's no-decay set (biases, LayerNorms, embeddings)."""
    t = cfg.train
    no_decay = model.no_decay_param_names() if hasattr(model, "no_decay_param_names") else set()
    if not t.no_decay_embeddings:  # keep the embeddings' decay; still exempt biases and norms
        no_decay = {n for n in no_decay if n.endswith("bias") or "norm" in n}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if one_per_param:
        return [{"params": [p], "weight_decay": 0.0 if n in no_decay else t.weight_decay, "name": n} for n, p in named]
    return [
        {"params": [p for n, p in named if n not in no_decay], "weight_decay": t.weight_decay, "name": "decay"},
        {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0, "name": "no_decay"},
    ]


def make_optimizer(model, cfg: Config):
    t = cfg.train
    if t.optimizer == "lamb":
        partitioned = t.zero_stage >= 1
        return Lamb(param_groups(model, cfg, one_per_param=partitioned), lr=t.lr, betas=tuple(t.betas),
                    weight_decay=t.weight_decay, partitioned=partitioned)
    return AdamW(param_groups(model, cfg, one_per_param=False), lr=t.lr, betas=tuple(t.betas),
                 weight_decay=t.weight_decay)


# --------------------------------------------------------------------------------------------
# LR schedule: linear warmup, then cosine decay to lr * lr_floor at total_steps (RIN_SPEC.md)


class WarmupCosine:
    """Multiplier of the base LR at a step; a class (not a lambda) so LambdaLR can save it."""

    def __init__(self, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, cfg: Config):
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(t.warmup_steps, t.total_steps, t.lr_floor))


# --------------------------------------------------------------------------------------------
# DeepSpeed


def ds_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config: global batch fixed, micro-batch and accumulation from the world size.
    load_universal: the state to resume is a universal checkpoint (saved at another world size)."""
    t = cfg.train
    micro, accum = check_world(cfg, world_size)
    zero = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    c = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our LAMB / AdamW (ZeRO-aware, see Lamb)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "FAIL", "load_universal": load_universal},
    }
    if t.grad_clip > 0:
        c["gradient_clipping"] = t.grad_clip
    return c


def configure_checkpointing(model, cfg: Config) -> None:
    """Route every k-th RIN block through DeepSpeed's activation checkpointing (or none)."""
    k = cfg.train.activation_checkpointing
    if not k:
        model.checkpoint_fn = None
        return
    import deepspeed

    deepspeed.checkpointing.configure(None, partition_activations=False, contiguous_checkpointing=False,
                                      checkpoint_in_cpu=cfg.train.checkpoint_cpu_offload, synchronize=False,
                                      profile=False)
    model.checkpoint_fn = deepspeed.checkpointing.checkpoint
    model.checkpoint_every = k


def build_engine(model, cfg: Config, world_size: int, load_universal: bool = False):
    """(engine, base optimizer, LR scheduler). The model must already be on its device."""
    import deepspeed

    configure_checkpointing(model, cfg)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=ds_config(cfg, world_size, load_universal))
    return engine, opt, sched
