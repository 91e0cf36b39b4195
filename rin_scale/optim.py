"""Optimizers and the LR schedule the trainer hands to DeepSpeed.

    opt = make_optimizer(model, cfg)      # LAMB or AdamW; no decay / no trust ratio on biases and norms
    sched = make_scheduler(opt, cfg)      # linear warmup, then (part of) a cosine decay
"""
from __future__ import annotations

import math
import time
import warnings

import torch
import torch.distributed as dist

from .config import Config


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
    """True when every tensor is finite on every rank (collective). One sum on the gradients' device
    (NCCL reduces CUDA tensors only), one host sync per step. A NaN or Inf anywhere makes the sum
    non-finite, and a sum reads each tensor once (isfinite + any wrote a bool copy of each); finite
    values whose sum overflows fp32 (3e38) would count as non-finite, as they should."""
    tensors = list(tensors)
    dev = tensors[0].device if tensors else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    total = torch.zeros(1, device=dev)
    for x in tensors:
        total += x.sum(dtype=torch.float32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return bool(torch.isfinite(total).item())


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019) as tfa.optimizers.LAMB, which the authors use: the Adam direction plus
    decoupled decay, u = m_hat / (sqrt(v_hat) + eps) + wd * w, scaled per tensor by the trust ratio
    ||w|| / ||u||. A group with "adapt": False (the authors' exclude_from_layer_adaptation: biases
    and LayerNorm scales and offsets) takes the plain step lr * u, and so does a tensor whose norm
    or update norm is zero (tfa: where(||w|| > 0, where(||u|| > 0, ||w|| / ||u||, 1), 1)), so a
    zero-initialized weight moves at step 1.

    With `partitioned=True` (ZeRO), DeepSpeed hands each group's step this rank's flat fp32
    partition of the group's tensors. `pieces` (engine.zero_pieces, set once the engine is built)
    says where in it each of the group's tensors lies, (start, length), length 0 where this rank
    holds none of it: the norms of every piece are summed over all ranks in one all-reduce per
    group, so each trust ratio is that of the whole layer, exactly as without ZeRO (one
    collective per group, where one group per tensor cost one per tensor). Without `pieces`, each
    parameter is taken as one tensor. ZeRO checks the gradients for non-finite values itself."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, partitioned=False,
                 compiled=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adapt=True, step=0))
        self.partitioned = partitioned
        self.pieces = None  # flat ZeRO partition -> [(start, length)] per tensor of its group
        self.overflow = False
        # (moments, update) from compiled_passes(), or None: the eager cache-sliced passes below
        self.passes = compiled_passes(self._device()) if compiled else None

    def _device(self) -> torch.device:
        return next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))

    @torch.no_grad()
    def step(self, closure=None):
        # Under ZeRO, DeepSpeed has already skipped a step whose gradient norm is not finite, and it
        # calls step() once per group: a check here would cost an all-reduce and a host sync each.
        if not self.partitioned:
            self.overflow = not _all_finite(p.grad for g in self.param_groups for p in g["params"]
                                            if p.grad is not None)
            if self.overflow:
                return None
        _count_step(self)
        # (group, (weight, grad, m, v), bias corrections (1 / (1 - b1^k), 1 / sqrt(1 - b2^k))): one per
        # tensor, whole or this rank's piece of it
        todo = []
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
                k = st["step"].item()  # a CPU tensor: no device sync
                bias = (1 / (1 - b1 ** k), 1 / math.sqrt(1 - b2 ** k))
                tensors = (p, p.grad, st["exp_avg"], st["exp_avg_sq"])
                if self.partitioned and self.pieces is not None:
                    flat = [t.view(-1) for t in tensors]
                    todo += [(g, tuple(f[s:s + n] for f in flat), bias) for s, n in self.pieces(p)]
                else:
                    todo.append((g, tensors, bias))
        if not todo:
            return None
        if self.passes:
            return self._compiled_step(todo)
        norms = []
        for g, tensors, bias in todo:
            b1, b2 = g["betas"]
            p = tensors[0]
            u_sq = p.new_zeros((), dtype=torch.float32)
            for w, grad, m, v in _slices(*tensors):
                grad = grad.float()
                m.lerp_(grad, 1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                u_sq += torch.linalg.vector_norm(_direction(g, bias, w, m, v)) ** 2
            norms.append(torch.stack([torch.linalg.vector_norm(p, dtype=torch.float32) ** 2, u_sq]))
        # One host sync per step (the finite check has one already), not one per tensor: the update
        # w - lr r (c1 m / d + wd w) = w (1 - lr r wd) - lr r c1 m / d takes Python scalars.
        for (g, (p, _, m, v), bias), r in zip(todo, self._trust(todo, norms).tolist()):
            lr, wd = g["lr"] * r, g["weight_decay"]
            for w, m, v in _slices(p, m, v):
                if wd:
                    w.mul_(1 - lr * wd)
                w.addcdiv_(m, _denom(g, bias, v), value=-lr * bias[0])
        return None

    def _trust(self, todo, norms):
        """Each tensor's trust ratio from its [||w||^2, ||u||^2] (1 where the group does not adapt)."""
        norms = torch.stack(norms)
        if self.partitioned and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(norms)  # each row is one whole tensor, its pieces on the ranks
        wn, un = norms.sqrt().unbind(1)
        one = torch.ones_like(wn)
        trust = torch.where((wn > 0) & (un > 0), wn / torch.where(un > 0, un, one), one)
        return torch.where(_on_device([g.get("adapt", True) for g, *_ in todo], trust.device, torch.bool), trust, one)

    def _compiled_step(self, todo):
        """The same step through the compiled passes. Scalars go in as tensors: torch.compile would
        specialize on some Python floats and recompile for each new bias correction. All tensors'
        scalars reach the device in one copy, then rows cloned apart: plain tensors like the ones
        the passes were compiled for at start-up."""
        moments, update = self.passes
        dev = todo[0][1][0].device
        h = _on_device([[1 - g["betas"][0], g["betas"][1], 1 - g["betas"][1], *bias, g["eps"], g["weight_decay"]]
                        for g, _, bias in todo], dev)
        hs = [row.clone() for row in h]
        zero = torch.zeros(2, device=dev)
        # an empty piece (a tensor wholly on other ranks) would compile anew: dynamic shapes treat 0 apart
        norms = [moments(*map(_flat, ts), hs[i]) if ts[0].numel() else zero for i, (_, ts, _) in enumerate(todo)]
        lr = self._trust(todo, norms) * _on_device([g["lr"] for g, *_ in todo], dev)
        for i, (_, (p, _, m, v), _) in enumerate(todo):
            if p.numel():
                update(*map(_flat, (p, m, v)), hs[i], lr[i].clone())
        return None


def _on_device(values, dev: torch.device, dtype=torch.float32) -> torch.Tensor:
    """Python scalars as a tensor on `dev`. For a GPU they go through pinned memory, copied without
    waiting: torch.tensor(..., device="cuda") copies from pageable memory, which makes the host wait
    for the copy every step."""
    if dev.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=dev)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(dev, non_blocking=True)


# Elements per slice of a CPU tensor in the LAMB step. The trust ratio needs ||u|| before any
# weight moves, so the step runs twice over each tensor (moments and ||u||, then the update,
# recomputing sqrt(v_hat)); slices this size keep the temporaries in cache, so memory traffic is
# that of the moments and weights alone. On the cifar10 model (31M parameters, 2 threads, AVX-512
# EPYC) this step with the sum-based finite check takes ~0.09 s, against ~0.2 s for whole tensors,
# u kept for every tensor and isfinite; 2^16 and 2^20 were slower. GPUs take whole tensors (fewer
# kernel launches).
CPU_SLICE = 1 << 18


def _slices(*tensors):
    """Matching flat slices of same-shaped tensors (one slice each for GPU or non-contiguous ones)."""
    first = tensors[0]
    if first.device.type != "cpu" or not all(t.is_contiguous() for t in tensors):
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for s in range(0, first.numel(), CPU_SLICE):
        yield tuple(f[s:s + CPU_SLICE] for f in flat)


def _denom(g, bias, v):
    """sqrt(v_hat) + eps, with bias = (1 / (1 - b1^k), 1 / sqrt(1 - b2^k)): a new fp32 tensor."""
    return v.sqrt().mul_(bias[1]).add_(g["eps"])


def _direction(g, bias, w, m, v):
    """LAMB's u = m_hat / (sqrt(v_hat) + eps) + wd * w = c1 m / d + wd w, as a new fp32 tensor."""
    if g["weight_decay"]:
        return torch.addcdiv(w.float() * g["weight_decay"], m, _denom(g, bias, v), value=bias[0])
    d = _denom(g, bias, v)
    return torch.div(m, d, out=d).mul_(bias[0])


# --------------------------------------------------------------------------------------------
# The same two passes compiled (torch.compile, inductor): each becomes one fused loop over a
# tensor, which reads the gradient, moments and weights once (and sums ||w||^2 on the way). On
# the cifar10 model (31M parameters, 2 threads of the Intel Xeon, alone) the LAMB step takes
# 0.095 s against 0.137 s for the eager slices (bench/train_throughput.py): both are near the
# memory bandwidth, which the step's ~1.4 GB of reads and writes fill. ~15 s of compiling on a
# cold cache; inductor keeps its cache on disk, so a requeued run on the same machine compiles in
# a few seconds. Dynamic shapes: one graph serves every tensor size (two: inductor splits small
# and large). The scalars go in as tensors, so a new step's bias corrections or learning rate
# never recompile. On a GPU the eager passes launch ~10 kernels per tensor, the compiled ones 2.

# Parameters from which train.compile_optimizer=auto compiles: below, the compile outlasts what it saves.
COMPILE_MIN_PARAMS = 10_000_000


def _moments_pass(w, grad, m, v, h):
    """Adam moments in place; returns [||w||^2, ||u||^2]. h = [1 - b1, b2, 1 - b2, c1, c2, eps, wd]
    (c1, c2 the bias corrections)."""
    grad, w = grad.float(), w.float()
    m.lerp_(grad, h[0])
    v.mul_(h[1]).add_(grad * grad * h[2])
    u = m * h[3] / (v.sqrt() * h[4] + h[5]) + w * h[6]
    return torch.stack([(w * w).sum(), (u * u).sum()])


def _update_pass(w, m, v, h, lr):
    """w (1 - lr wd) - lr c1 m / (c2 sqrt(v) + eps), in place; lr carries the trust ratio."""
    w.mul_(1 - lr * h[6]).sub_(lr * h[3] * m / (v.sqrt() * h[4] + h[5]))


def _flat(t):
    """A contiguous tensor as a 1-D tensor on the same memory that is not a view: torch.compile guards
    on a view's base shape, so views of differently shaped tensors would each compile anew. A
    non-contiguous one (RIN has none) goes in as it is and compiles on first sight, mid-step."""
    if not t.is_contiguous():
        return t.detach()
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),))


_COMPILED: dict = {}
COMPILE_SECONDS: dict = {}  # device type: seconds the compile took, for the trainer's log


def compiled_passes(dev: torch.device):
    """(moments, update) compiled for the device type, or None where torch.compile fails here (no C++
    compiler, no Triton): LAMB then runs its eager passes, with a warning. Compiled once per process,
    on throwaway tensors, so that a failure never leaves a real step half-applied."""
    if dev.type not in _COMPILED:
        t0 = time.perf_counter()
        try:
            passes = (torch.compile(_moments_pass, dynamic=True), torch.compile(_update_pass, dynamic=True))
            h = torch.tensor([0.1, 0.999, 0.001, 10.0, 31.6, 1e-8, 0.01], device=dev)
            with torch.no_grad():
                for n in (64, 1 << 16):  # inductor compiles small and large tensors apart
                    w, grad, m, v = (torch.ones(n, device=dev) for _ in range(4))
                    passes[0](w, grad, m, v, h)
                    passes[1](w, m, v, h, torch.tensor(1e-3, device=dev))
            _COMPILED[dev.type] = passes
            COMPILE_SECONDS[dev.type] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eager
            warnings.warn(f"LAMB runs its eager passes: torch.compile failed here ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); train.compile_optimizer=never "
                          "skips the attempt", RuntimeWarning, stacklevel=2)
            _COMPILED[dev.type] = None
    return _COMPILED[dev.type]


def compile_wanted(setting: str, n_params: int) -> bool:
    """train.compile_optimizer: 'always', 'never', or 'auto' (from COMPILE_MIN_PARAMS parameters)."""
    return setting == "always" or (setting == "auto" and n_params >= COMPILE_MIN_PARAMS)


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


def decay_and_adapt(model, cfg: Config) -> tuple[set[str], set[str]]:
    """(names without weight decay, names without the LAMB trust ratio).

    No trust ratio: the model's biases and LayerNorm scales and offsets (the authors'
    exclude_from_layer_adaptation). No decay: the same, plus the embeddings (positional, learned
    latents, class) when train.no_decay_embeddings; the authors decay the embeddings (their
    exclude_from_weight_decay is biases and LayerNorms only), as the cifar10 / imagenet presets do."""
    exempt = model.trust_ratio_exempt_names() if hasattr(model, "trust_ratio_exempt_names") else set()
    if not cfg.train.no_decay_embeddings:  # keep the embeddings' decay; still exempt biases and norms
        return exempt, exempt
    no_decay = model.no_decay_param_names() if hasattr(model, "no_decay_param_names") else set()
    return no_decay, exempt


def param_groups(model, cfg: Config, one_per_param: bool, layer_adaptation: bool = True) -> list[dict]:
    """Weight decay off for the no-decay set; "adapt": False (LAMB trust ratio 1) for biases and
    LayerNorms when `layer_adaptation`. Empty groups are left out."""
    tc = cfg.train
    no_decay, exempt = decay_and_adapt(model, cfg)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def key(n):
        return (n not in no_decay, not (layer_adaptation and n in exempt))

    if one_per_param:
        return [{"params": [p], "weight_decay": tc.weight_decay if key(n)[0] else 0.0, "adapt": key(n)[1], "name": n}
                for n, p in named]
    groups = []
    for decay, adapt in ((True, True), (False, True), (True, False), (False, False)):
        ps = [p for n, p in named if key(n) == (decay, adapt)]
        if ps:
            name = ("decay" if decay else "no_decay") + ("" if adapt else "_no_adapt")
            groups.append({"params": ps, "weight_decay": tc.weight_decay if decay else 0.0, "adapt": adapt,
                           "name": name})
    return groups


def make_optimizer(model, cfg: Config, groups: str = "by_setting"):
    """groups: "by_setting" (up to 4: decay or not, trust ratio or not), or "per_tensor" (LAMB under
    ZeRO, for a state saved in that layout before trainer.json named its groups: it resumes as
    it was saved)."""
    tc = cfg.train
    if tc.optimizer == "lamb":
        partitioned = tc.zero_stage >= 1
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        one = partitioned and groups == "per_tensor"
        return Lamb(param_groups(model, cfg, one_per_param=one), lr=tc.lr, betas=tuple(tc.betas),
                    eps=tc.eps, weight_decay=tc.weight_decay, partitioned=partitioned,
                    compiled=compile_wanted(tc.compile_optimizer, n_params))
    return AdamW(param_groups(model, cfg, one_per_param=False, layer_adaptation=False), lr=tc.lr,
                 betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay)


# --------------------------------------------------------------------------------------------
# LR schedule: linear warmup, then a cosine decay (RIN_SPEC.md). The authors' `cosine@R` (pix2seq
# models/model_utils.py WarmUpAndDecay) runs only the first R of the cosine's half period over the
# decay: lr * (f + (1 - f) * 0.5 * (1 + cos(pi * R * progress))), f = end_lr_factor (0 in their
# configs), so cifar10's cosine@0.8 ends at 0.095 lr and imagenet64's cosine@0.7 at 0.206 lr.
# train.lr_cosine_fraction is R, train.lr_floor is f; R = 1 is a plain cosine down to lr * f.


class WarmupCosine:
    """Multiplier of the base LR at a step; a class (not a lambda) so LambdaLR can save it."""

    def __init__(self, warmup: int, total: int, floor: float, fraction: float = 1.0):
        self.warmup, self.total, self.floor, self.fraction = warmup, total, floor, fraction

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * self.fraction * progress))


def make_scheduler(optimizer, cfg: Config):
    tc = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(tc.warmup_steps, tc.total_steps, tc.lr_floor, tc.lr_cosine_fraction))
