"""The authors' recipe (issue #14): LAMB as tfa's (no trust ratio on biases and LayerNorms, a plain
step for zero tensors, eps 1e-8), embeddings decayed, and the cifar10 preset's class token."""
import math

import pytest
import torch

from rin_scale.config import load_config
from rin_scale.model import RIN
from rin_scale import optim
from rin_scale.optim import Lamb, make_optimizer, make_scheduler, param_groups
from rin_scale.presets import get_preset


def small_lamb_cfg(*extra):
    return load_config("cifar10", ["model.image_size=8", "model.patch_size=4", "model.interface_dim=16",
                                   "model.latent_dim=32", "model.num_latents=6", "model.num_blocks=2",
                                   "model.latent_layers=1", "model.latent_heads=2", "model.read_write_heads=2",
                                   "train.zero_stage=0", *extra])


def adam_direction(p, g, eps, wd):
    """First step: bias-corrected m = g, v = g^2."""
    return g / (g.abs() + eps) + wd * p


@pytest.mark.parametrize("partitioned,cpu_slice", [(False, None), (True, None), (False, 7)])
def test_lamb_trust_ratio_skips_biases_and_layernorms_only(partitioned, cpu_slice, monkeypatch):
    if cpu_slice:  # tensors in many slices of the cache-sized step, some of them ragged
        monkeypatch.setattr(optim, "CPU_SLICE", cpu_slice)
    cfg = small_lamb_cfg(f"train.zero_stage={1 if partitioned else 0}")
    torch.manual_seed(0)
    model = RIN(cfg.model)
    opt = make_optimizer(model, cfg)  # single process: partitioned = one group per parameter
    assert isinstance(opt, Lamb) and opt.partitioned == partitioned
    for g in opt.param_groups:
        g["lr"] = 0.01  # no scheduler: the peak LR
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    grads = {n: torch.randn_like(p) for n, p in named.items()}
    for n, p in named.items():
        p.grad = grads[n].clone()
    opt.step()
    eps, wd = cfg.train.eps, cfg.train.weight_decay
    exempt = model.trust_ratio_exempt_names()
    checked = {"plain": 0, "trust": 0}
    for n, p in named.items():
        decay = 0.0 if n in exempt else wd  # the authors decay everything but biases and LayerNorms
        u = adam_direction(before[n], grads[n], eps, decay)
        w0 = before[n]
        if n in exempt or w0.norm() == 0:
            expected, kind = w0 - 0.01 * u, "plain"
        else:
            expected, kind = w0 - 0.01 * (w0.norm() / u.norm()) * u, "trust"
        assert torch.allclose(p.detach(), expected, rtol=1e-5, atol=1e-7), n
        checked[kind] += 1
    # both kinds were seen: biases and LayerNorms (plain), weights and embeddings (trust ratio)
    assert checked["plain"] >= 10 and checked["trust"] >= 10
    for n in ("blocks.0.read.norm.weight", "blocks.0.read.norm.bias", "blocks.1.compute.0.mlp.fc1.bias",
              "prev_norm.weight", "stem_norm.bias", "stem.bias"):
        assert n in exempt, n
    for n in ("pos_emb", "latent_init", "class_emb.weight", "blocks.0.read.attn.out.weight", "stem.weight"):
        assert n not in exempt, n


def test_zero_tensor_gets_a_plain_adam_step_at_step_one():
    w = torch.nn.Parameter(torch.zeros(6, 5))
    b = torch.nn.Parameter(torch.randn(6, 5))  # a non-zero neighbour in the same group
    g = torch.randn(6, 5)
    w.grad, b.grad = g.clone(), torch.randn(6, 5)
    opt = Lamb([w, b], lr=0.1, weight_decay=0.01)
    opt.step()
    assert torch.allclose(w.detach(), -0.1 * g / (g.abs() + 1e-8), atol=1e-7)
    assert (w.detach().abs() > 0.09).all()  # each entry moved by ~lr, not by lr * 0


def test_read_write_outputs_move_off_zero_under_lamb():
    """rw_out_init=zero under LAMB: write's output projection gets a plain Adam step at step 1."""
    cfg = small_lamb_cfg("model.rw_out_init=zero")
    torch.manual_seed(0)
    model = RIN(cfg.model)
    opt = make_optimizer(model, cfg)
    from rin_scale.diffusion import training_loss

    loss, _ = training_loss(model, torch.rand(2, 3, 8, 8) * 2 - 1, cfg.diffusion, labels=torch.tensor([1, 2]))
    loss.backward()
    assert model.blocks[0].write.attn.out.weight.norm() == 0
    opt.step()
    assert model.blocks[0].write.attn.out.weight.norm() > 0


def test_lamb_presets_follow_the_authors_optimizer():
    for name in ("cifar10", "cifar10_uncond", "imagenet64", "imagenet64_p4", "imagenet256"):
        cfg = get_preset(name)
        t = cfg.train
        assert t.optimizer == "lamb" and t.eps == 1e-8 and tuple(t.betas) == (0.9, 0.999) and t.weight_decay == 0.01
        assert not t.no_decay_embeddings, name  # the authors decay the embeddings
        assert cfg.model.rw_out_init == "glorot", name
    cfg = small_lamb_cfg()
    model = RIN(cfg.model)
    groups = {n: g for g in param_groups(model, cfg, one_per_param=True) for n in [g["name"]]}
    for n in ("pos_emb", "latent_init", "class_emb.weight", "blocks.0.compute.0.attn.q.weight"):
        assert groups[n]["weight_decay"] == 0.01 and groups[n]["adapt"], n
    for n in ("blocks.0.read.norm.weight", "blocks.0.compute.0.attn.q.bias", "prev_norm.bias"):
        assert groups[n]["weight_decay"] == 0.0 and not groups[n]["adapt"], n


def test_tiny_keeps_adamw_and_zero_read_write_outputs():
    cfg = get_preset("tiny")
    assert cfg.train.optimizer == "adamw" and cfg.model.rw_out_init == "zero"
    model = RIN(cfg.model)
    assert all(b.read.attn.out.weight.norm() == 0 and b.write.attn.out.weight.norm() == 0 for b in model.blocks)
    opt = make_optimizer(model, cfg)
    assert all("adapt" not in g or g["adapt"] for g in opt.param_groups)  # AdamW: no LAMB split


def test_cifar10_preset_is_class_conditional_with_128_latent_slots():
    cfg = get_preset("cifar10")
    m = cfg.model
    assert m.num_classes == 10 and m.class_dropout == 0.0 and m.num_latents == 128
    model = RIN(m)
    assert model.class_emb is not None and tuple(model.class_emb.weight.shape) == (10 + 1, 512)
    assert tuple(model.latent_init.shape) == (1, 126, 512)  # + time + class = 128 slots
    assert all(b.read.attn.out.weight.norm() > 0 for b in model.blocks)  # glorot (bench/recipe_init.py)
    with torch.no_grad():
        z = model.initial_latents(torch.rand(2), torch.tensor([3, 7]), None)
    assert tuple(z.shape) == (2, 128, 512)
    assert not torch.allclose(z[0, -1], z[1, -1])  # the class token differs with the label
    unc = get_preset("cifar10_uncond").model
    assert unc.num_classes == 0 and unc.num_latents == 128


@pytest.mark.parametrize("name,rate", [("cifar10", 0.8), ("imagenet64", 0.7)])
def test_lr_schedule_is_the_authors_cosine_at_rate(name, rate):
    """pix2seq WarmUpAndDecay, cosine@R with end_lr_factor 0: CosineDecay over (total - warmup) / R."""
    t = get_preset(name).train
    assert t.warmup_steps == 10_000 and t.total_steps == 150_000
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    f = make_scheduler(opt, get_preset(name)).lr_lambdas[0]
    decay = t.total_steps - t.warmup_steps
    for step in (t.warmup_steps, 40_000, 80_000, 120_000, t.total_steps):
        theirs = 0.5 * (1 + math.cos(math.pi * min(step - t.warmup_steps, decay) / (decay / rate)))
        assert f(step) == pytest.approx(theirs, abs=1e-9), step
    assert f(t.total_steps) == pytest.approx({"cifar10": 0.0955, "imagenet64": 0.2061}[name], abs=1e-3)
    assert f(t.warmup_steps // 2 - 1) == pytest.approx(0.5)  # linear warmup


@pytest.mark.parametrize("partitioned", [False, True])
def test_compiled_lamb_steps_as_the_eager_one(partitioned):
    """train.compile_optimizer: the compiled passes apply the same update as the eager slices (to
    fp32 rounding: the fused loop sums ||u|| in another order), trust ratio and exemptions included."""
    cfg = small_lamb_cfg(f"train.zero_stage={1 if partitioned else 0}", "model.rw_out_init=zero")
    from torch._dynamo.utils import counters

    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = RIN(cfg.model)
        opt = Lamb(param_groups(model, cfg, one_per_param=partitioned), lr=0.01, weight_decay=0.01,
                   partitioned=partitioned, compiled=compiled)
        assert (opt.passes is not None) == compiled
        compiles = counters["frames"]["ok"]
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        # compiled once, before the first step: new shapes, bias corrections and LRs compile nothing
        assert counters["frames"]["ok"] == compiles
        runs.append(dict(model.named_parameters()))
    eager, compiled = runs
    for n, p in eager.items():
        assert torch.allclose(compiled[n], p, rtol=1e-5, atol=1e-7), n
    # the zero-initialized write output moved (a plain step), and not by the same amount as a weight
    assert compiled["blocks.0.write.attn.out.weight"].norm() > 0


def test_optimizer_compile_choice():
    assert not optim.compile_wanted("auto", optim.COMPILE_MIN_PARAMS - 1)
    assert optim.compile_wanted("auto", optim.COMPILE_MIN_PARAMS)
    assert optim.compile_wanted("always", 1) and not optim.compile_wanted("never", 10**9)
    assert make_optimizer(RIN(small_lamb_cfg().model), small_lamb_cfg()).passes is None  # a small model: eager
