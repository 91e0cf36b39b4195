"""Training in process for the bench scripts (bench/self_cond.py, bench/video_demo.py): the
trainer's optimizer, LR schedule, EMA and loss, without DeepSpeed, for quick comparisons of
settings at equal steps or equal wall time."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

TIMING_STEPS = 8  # steps timed (after one warm-up) to size a run to --minutes


def fit(cfg, seed: int, make_batches: Callable, steps: int = 0, minutes: float = 0.0, log=None):
    """A RIN of cfg.model trained for `steps` (or as many as fill `minutes`, timed on a throwaway
    copy first). make_batches(gen) returns a function giving each step's (x0, training_loss
    keyword arguments); gen (seeded from `seed`) also draws t, noise, label dropout and the
    self-conditioning coins. cfg.train.total_steps is set to the step count, so the LR schedule
    is the whole schedule, squeezed. Returns (EMA model in eval mode, {steps, train_seconds,
    train_loss over the last 10% of steps})."""
    from rin_scale.diffusion import training_loss
    from rin_scale.ema import EMA
    from rin_scale.model import RIN
    from rin_scale.optim import make_optimizer, make_scheduler

    torch.manual_seed(seed)
    model = RIN(cfg.model)
    gen = torch.Generator().manual_seed(1000 + seed)

    def parts():
        return make_optimizer(model, cfg), EMA(model, cfg.train.ema_decay)

    def step_fn(batch, opt, sched, ema, k):
        x0, kwargs = batch()
        loss, _ = training_loss(model, x0, cfg.diffusion, generator=gen, **kwargs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        ema.update(ema.decay_at(k, cfg.train.ema_warmup, cfg.train.ema_warmup_offset))
        return loss.item()

    if minutes:  # time a few steps of a throwaway copy, then size the run to the wall time
        state = {k: v.clone() for k, v in model.state_dict().items()}
        (opt, ema), batch = parts(), make_batches(gen)
        sched = make_scheduler(opt, cfg)
        step_fn(batch, opt, sched, ema, 1)  # warm-up
        t1 = time.time()
        for k in range(TIMING_STEPS):
            step_fn(batch, opt, sched, ema, k + 2)
        per = (time.time() - t1) / TIMING_STEPS
        steps = max(int(minutes * 60 / per), 10)
        model.load_state_dict(state)
        gen.manual_seed(1000 + seed)
        if log:
            log(f"  {per * 1000:.0f} ms/step -> {steps} steps in {minutes} min")
    cfg.train.total_steps = steps
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(steps // 10, 1))
    (opt, ema), batch = parts(), make_batches(gen)
    sched = make_scheduler(opt, cfg)
    model.train()
    losses, t0 = [], time.time()
    for k in range(1, steps + 1):
        losses.append(step_fn(batch, opt, sched, ema, k))
        if log and k % max(steps // 5, 1) == 0:
            log(f"  step {k}/{steps}  loss {np.mean(losses[-50:]):.4f}  {time.time() - t0:.0f} s")
    ema_model = RIN(cfg.model)
    ema_model.load_state_dict(ema.full_state())
    return ema_model.eval(), {"steps": steps, "train_seconds": round(time.time() - t0, 1),
                              "train_loss": float(np.mean(losses[-max(len(losses) // 10, 1):]))}
