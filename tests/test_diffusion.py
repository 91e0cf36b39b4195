"""Diffusion: schedules, the self-conditioned training loss, samplers, and a real overfit run."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from rin_scale import diffusion as D
from rin_scale.config import ConfigError, DiffusionConfig, ModelConfig
from rin_scale.model import RIN

from conftest import small_model_config

torch.set_num_threads(1)


def small_rin(**kw) -> RIN:
    return RIN(small_model_config(**{"num_classes": 0, "class_dropout": 0.0, **kw}))


class Recorder(torch.nn.Module):
    """Wraps a real RIN and records every call (arguments, grad mode, returned latents)."""

    def __init__(self, model):
        super().__init__()
        self.module = model
        self.calls = []

    def forward(self, x_t, gamma, labels=None, prev_latents=None, cond=None):
        out, latents = self.module(x_t, gamma, labels, prev_latents, cond)
        self.calls.append(dict(x_t=x_t, gamma=gamma.clone(), labels=labels, prev=prev_latents, cond=cond,
                               grad=torch.is_grad_enabled(), latents=latents))
        return out, latents


# ------------------------------------------------------------------------------------------- schedules

def test_schedules_match_closed_forms():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    cfg = DiffusionConfig(sigmoid_start=-3, sigmoid_end=3, sigmoid_tau=0.9)
    s = lambda v: 1 / (1 + math.exp(-v))
    for ti, g in zip(t.tolist(), D.gamma_fn(t, "sigmoid", cfg).tolist()):
        want = (s(3 / 0.9) - s((ti * 6 - 3) / 0.9)) / (s(3 / 0.9) - s(-3 / 0.9))
        assert g == pytest.approx(min(max(want, 1e-9), 1.0), rel=1e-5, abs=1e-7)
    for ti, g in zip(t.tolist(), D.gamma_fn(t, "cosine").tolist()):
        assert g == pytest.approx(max(math.cos((ti + 2e-4) / (1 + 2.5e-4) * math.pi / 2) ** 2, 1e-9), rel=1e-5, abs=1e-7)
    assert torch.allclose(D.gamma_fn(t, "linear"), (1 - t).clamp(1e-9, 1).float())
    # Endpoints: clean at t=0, (almost) pure noise at t=1, monotone in between.
    for name in ("sigmoid", "cosine", "linear"):
        g = D.gamma_fn(t, name, cfg)
        assert g[0] > 0.999 and g[-1] < 1e-3 and bool((g[1:] <= g[:-1]).all())
    with pytest.raises(ConfigError, match="sigmoid, cosine or linear"):
        D.gamma_fn(t, "quadratic")


# ------------------------------------------------------------------------------------------ the loss

def test_network_sees_gamma_not_t():
    rec = Recorder(small_rin())
    cfg = DiffusionConfig(schedule="cosine", self_cond_rate=0.0)
    _, details = D.training_loss(rec, torch.rand(16, 3, 8, 8) * 2 - 1, cfg, generator=torch.Generator().manual_seed(0))
    (call,) = rec.calls
    assert torch.equal(call["gamma"], details["gamma"])
    assert torch.allclose(details["gamma"], D.gamma_fn(details["t"], "cosine"))
    assert not torch.allclose(call["gamma"], details["t"]) and not torch.allclose(call["gamma"], 1 - details["t"])


def test_self_conditioning_first_pass_has_no_grad_and_mask_is_per_example():
    rec = Recorder(small_rin())
    cfg = DiffusionConfig(self_cond_rate=0.5)
    x0 = torch.rand(64, 3, 8, 8) * 2 - 1
    loss, details = D.training_loss(rec, x0, cfg, generator=torch.Generator().manual_seed(0))
    first, second = rec.calls
    assert first["grad"] is False and first["prev"] is None and not first["latents"].requires_grad
    assert second["grad"] is True and not second["prev"].requires_grad
    mask = details["self_cond"]
    assert 0 < int(mask.sum()) < 64  # some examples keep their latents and some do not, in one batch
    assert torch.equal(second["prev"][mask], first["latents"][mask])
    assert bool((second["prev"][~mask] == 0).all())
    assert torch.equal(first["x_t"], second["x_t"]) and torch.equal(first["gamma"], second["gamma"])
    assert details["loss"].shape == (64,) and loss.item() == pytest.approx(details["loss"].mean().item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in rec.module.parameters())


def test_self_conditioning_rate_one_keeps_all_latents_and_zero_skips_first_pass():
    x0 = torch.rand(8, 3, 8, 8) * 2 - 1
    rec = Recorder(small_rin())
    D.training_loss(rec, x0, DiffusionConfig(self_cond_rate=1.0))
    assert torch.equal(rec.calls[1]["prev"], rec.calls[0]["latents"])
    rec = Recorder(small_rin())
    D.training_loss(rec, x0, DiffusionConfig(self_cond_rate=0.0))
    assert len(rec.calls) == 1 and rec.calls[0]["prev"] is None


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_loss_is_mse_to_the_target(target):
    """A stand-in network that returns the exact target has zero loss; returning zeros costs E[target^2]."""
    cfg = DiffusionConfig(target=target, self_cond_rate=0.0, schedule="linear", input_scale=0.5)
    x0 = torch.rand(32, 3, 8, 8) * 2 - 1
    seen = {}

    def exact(x_t, gamma, labels=None, prev_latents=None, cond=None):
        g = gamma.view(-1, 1, 1, 1)
        xs = x0 * 0.5
        eps = (x_t - g.sqrt() * xs) / (1 - g).sqrt()
        seen["x_t"] = x_t
        return {"eps": eps, "x0": xs, "v": g.sqrt() * eps - (1 - g).sqrt() * xs}[target], torch.zeros(32, 2, 4)

    loss, _ = D.training_loss(exact, x0, cfg, generator=torch.Generator().manual_seed(1))
    assert loss.item() < 1e-6
    assert seen["x_t"].abs().max() < 6  # built from the scaled data plus unit noise


def test_label_dropout_and_unlabelled_map_to_the_null_class():
    rec = Recorder(small_rin(num_classes=3, class_dropout=0.5))
    labels = torch.tensor([0, 1, 2, -1] * 16)
    D.training_loss(rec, torch.zeros(64, 3, 8, 8), DiffusionConfig(self_cond_rate=0.0), labels=labels,
                    generator=torch.Generator().manual_seed(0))
    seen = rec.calls[0]["labels"]
    assert bool((seen[3::4] == 3).all())  # -1 -> "no label"
    kept = seen[labels >= 0] == labels[labels >= 0]
    assert 0 < int(kept.sum()) < 48  # about half dropped, per example


# ---------------------------------------------------------------------------------------- samplers

@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampler_calls_network_n_times_and_carries_latents(sampler):
    rec = Recorder(small_rin())
    cfg = DiffusionConfig(sample_schedule="cosine")
    x = D.sample(rec, (3, 3, 8, 8), cfg, steps=7, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 8, 8) and len(rec.calls) == 7
    assert rec.calls[0]["prev"] is None
    for before, after in zip(rec.calls, rec.calls[1:]):
        assert after["prev"] is before["latents"]
    gammas = torch.stack([c["gamma"][0] for c in rec.calls])
    assert bool((gammas[1:] > gammas[:-1]).all())  # noise decreases
    want = D.gamma_fn(torch.tensor([1 - i / 7 for i in range(7)]), "cosine")
    assert torch.allclose(gammas, want)


def test_sampler_returns_last_x0_prediction_clipped_and_unscaled():
    """Stand-in networks with target x0 that predict a constant: the output is that constant,
    clipped to [-b, b] and divided by the input scale b, for both samplers."""
    cfg = DiffusionConfig(target="x0", input_scale=0.5)
    for value, want in ((0.3, 0.6), (2.0, 1.0), (-7.0, -1.0)):
        const = lambda x_t, g, *a: (torch.full_like(x_t, value), torch.zeros(x_t.shape[0], 2, 4))
        for sampler in ("ddpm", "ddim"):
            out = D.sample(const, (2, 3, 4, 4), cfg, steps=5, sampler=sampler)
            assert torch.allclose(out, torch.full_like(out, want))


def test_samplers_recover_training_images_with_an_exact_denoiser():
    """With the exact posterior-mean denoiser of 8 images (a stand-in for a perfectly trained
    network), every sample is one of the 8 images, for every target and sampler."""
    x0 = torch.rand(8, 3, 8, 8) * 2 - 1

    def oracle(target):
        def f(x_t, gamma, labels=None, prev=None, cond=None):
            g = gamma.view(-1, 1, 1, 1)
            d2 = (x_t[:, None] - g[:, None].sqrt() * x0[None]).pow(2).flatten(2).sum(-1)
            w = torch.softmax(-d2 / (2 * (1 - gamma.view(-1, 1))), 1)
            xh = torch.einsum("bk,kchw->bchw", w, x0)
            eps = (x_t - g.sqrt() * xh) / (1 - g).sqrt()
            return {"eps": eps, "x0": xh, "v": g.sqrt() * eps - (1 - g).sqrt() * xh}[target], torch.zeros(len(x_t), 2, 4)
        return f

    for target in ("eps", "x0", "v"):
        for sampler in ("ddpm", "ddim"):
            cfg = DiffusionConfig(target=target, sample_schedule="cosine")
            s = D.sample(oracle(target), (6, 3, 8, 8), cfg, steps=40, sampler=sampler,
                         generator=torch.Generator().manual_seed(0))
            assert torch.cdist(s.flatten(1), x0.flatten(1)).min(1).values.max() < 1e-3, (target, sampler)


def test_guidance_batches_cond_and_uncond_in_one_call_per_step():
    rec = Recorder(small_rin(num_classes=4, class_dropout=0.1))
    cfg = DiffusionConfig(sampler="ddim", guidance=1.5)
    labels = torch.tensor([0, 3])
    D.sample(rec, (2, 3, 8, 8), cfg, labels=labels, steps=4)
    assert len(rec.calls) == 4
    assert all(torch.equal(c["labels"], torch.tensor([0, 3, 4, 4])) for c in rec.calls)
    assert all(c["x_t"].shape[0] == 4 for c in rec.calls)
    with pytest.raises(ConfigError, match="class-conditional"):
        D.sample(Recorder(small_rin()), (2, 3, 8, 8), cfg, steps=2)


def test_video_loss_and_sampling_with_conditioning_frames():
    rec = Recorder(small_rin(frames=4, cond_frames=2, patch_frames=2))
    cond = torch.rand(2, 3, 2, 8, 8) * 2 - 1
    cfg = DiffusionConfig(input_scale=0.5)
    loss, _ = D.training_loss(rec, torch.rand(2, 3, 2, 8, 8), cfg, cond=cond)
    assert torch.isfinite(loss) and torch.allclose(rec.calls[0]["cond"], cond * 0.5)
    out = D.sample(rec, (2, 3, 2, 8, 8), cfg, cond=cond, steps=3, sampler="ddim")
    assert out.shape == (2, 3, 2, 8, 8) and out.abs().max() <= 1.0


def test_sample_clip_extends_a_clip_conditioned_on_its_newest_frames():
    """A one-frame model (2 given frames stacked as channels) continues a clip to 5 frames: 3 passes,
    each conditioned on the last 2 frames so far, given or already predicted."""
    rec = Recorder(small_rin(frames=3, cond_frames=2, cond_mode="channels", patch_frames=1))
    given = torch.rand(2, 3, 2, 8, 8) * 2 - 1
    cfg = DiffusionConfig(input_scale=0.5, sampler="ddim")
    pred = D.sample_clip(rec, given, 5, cfg, steps=2)
    assert pred.shape == (2, 3, 3, 8, 8) and pred.abs().max() <= 1.0
    assert len(rec.calls) == 3 * 2
    clip = torch.cat([given, pred], 2)
    for i in range(3):  # pass i conditions on frames i, i + 1 (scaled as sample() scales them)
        for call in rec.calls[2 * i:2 * i + 2]:
            assert call["x_t"].shape == (2, 3, 1, 8, 8)
            assert torch.allclose(call["cond"], clip[:, :, i:i + 2] * 0.5)
    # Within the model's window it is one sample() call, the same draws as sample() itself.
    window = Recorder(small_rin(frames=4, cond_frames=2, patch_frames=2))
    a = D.sample_clip(window, given, 4, cfg, steps=2, sampler="ddpm", generator=torch.Generator().manual_seed(0))
    b = D.sample(window, (2, 3, 2, 8, 8), cfg, cond=given, steps=2, sampler="ddpm",
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b.float().clamp(-1, 1))


# ------------------------------------------------------------------------------ a real overfit run

def digits16():
    """scikit-learn's 8x8 digits, upscaled to 16x16 RGB in [-1, 1], with their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return x, torch.tensor(d.target)


OVERFIT_TARGET, OVERFIT_SCHEDULE, OVERFIT_STEPS = "x0", "cosine", 800  # x0 memorizes fastest here


@pytest.fixture
def all_cores():
    """torch on every core this process may use (2 here) for one in-process test, then back to the
    module's one thread."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    yield
    torch.set_num_threads(1)


def test_tiny_model_overfits_eight_digits_and_ddim_reproduces_them(all_cores):
    """A class-conditional tiny RIN trained on 8 real digits (0..7, one image each).

    Measure: the DDIM sample for label k must lie closer (RMSE) to training image k than to every
    other training image and to every one of 500 held-out digits (which include other instances
    of digit k), i.e. it is recognizably *that* image, for all 8 labels.

    The suite's slowest test, measured on the AVX2-only EPYC: 800 steps at batch 32 on both cores
    take 141 s (266 s on one core with latent_mlp_ratio=4). Nearest other training digit / own
    digit, worst label: 2.22; nearest held-out digit / own: 1.35. 400 or 600 steps, or batch 16,
    leave some sample nearer another digit."""
    torch.manual_seed(0)
    images, targets = digits16()
    x0, labels = images[:8], targets[:8]  # the digits 0..7, one image each
    held_out = images[500:1000]
    m = ModelConfig(image_size=16, channels=3, patch_size=2, interface_dim=64, interface_mlp_ratio=2,
                    latent_dim=128, num_latents=16, latent_mlp_ratio=2, num_blocks=2, latent_layers=2,
                    latent_heads=4, read_write_heads=4, dropout=0.0, drop_path=0.0, num_classes=10,
                    class_dropout=0.0)
    cfg = DiffusionConfig(target=OVERFIT_TARGET, schedule=OVERFIT_SCHEDULE, sample_schedule="cosine")
    model = RIN(m)

    def eval_loss():
        model.eval()
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            loss = sum(D.training_loss(model, x0, cfg, labels=labels, generator=g)[0].item() for _ in range(8)) / 8
        model.train()
        return loss

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=OVERFIT_STEPS, pct_start=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(OVERFIT_STEPS):
        loss, _ = D.training_loss(model, x0.repeat(4, 1, 1, 1), cfg, labels=labels.repeat(4), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    after = eval_loss()
    assert before / after >= 10, (before, after)

    model.eval()
    samples = D.sample(model, (8, 3, 16, 16), cfg, labels=labels, steps=25, sampler="ddim",
                       generator=torch.Generator().manual_seed(7))
    rmse = lambda a, b: torch.cdist(a.flatten(1), b.flatten(1)) / math.sqrt(a[0].numel())
    to_train = rmse(samples, x0)
    assert torch.equal(to_train.argmin(1), torch.arange(8)), to_train
    to_held_out = rmse(samples, held_out).min(1).values
    assert bool((to_train.diag() < to_held_out).all()), (to_train.diag(), to_held_out)
