"""Trainer parts in one process: activation checkpointing, LAMB, non-finite steps, LR schedule, EMA,
precision and CPU memory settings."""
import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from rin_scale.config import load_config
from rin_scale.diffusion import training_loss
from rin_scale.ema import EMA
from rin_scale.engine import Precision, build_engine, configure_checkpointing, device
from rin_scale.model import RIN
from rin_scale.optim import AdamW, Lamb, WarmupCosine
from rin_scale.train import LossWatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def one_process_group():
    """DeepSpeed's checkpointing needs a process group: a world of one over gloo, no env vars touched."""
    import deepspeed
    import torch.distributed as dist

    from conftest import free_port

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
                               init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def small_cfg(*extra):
    return load_config("tiny", ["model.latent_dim=64", "model.interface_dim=64", "model.latent_heads=4",
                                "model.read_write_heads=4", "model.num_latents=16", "model.num_blocks=3", *extra])


def grads(model, cfg, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    loss, _ = training_loss(model, x0, cfg.diffusion, labels=torch.tensor([0, 1, 2, 3]))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients(every, one_process_group):
    cfg = small_cfg(f"train.activation_checkpointing={every}")
    torch.manual_seed(0)
    model = RIN(cfg.model)
    plain = grads(model, cfg)
    calls = []
    configure_checkpointing(model, cfg)
    inner = model.checkpoint_fn
    model.checkpoint_fn = lambda block, x, z: calls.append(1) or inner(block, x, z)
    ckpt = grads(model, cfg)
    # 3 blocks, two forward passes (self-conditioning + the graded one): every=1 -> 6, every=2 -> 4
    assert len(calls) == (6 if every == 1 else 4)
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-4, atol=1e-6), n


def test_lamb_step_is_adam_direction_times_trust_ratio():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    w0 = w.detach().clone()
    g = torch.randn(8, 4)
    w.grad = g.clone()
    opt = Lamb([w], lr=0.1, betas=(0.9, 0.999), weight_decay=0.01)
    assert opt.defaults["eps"] == 1e-8  # the authors' LAMB epsilon
    opt.step()
    # First step: bias-corrected m = g, v = g^2.
    u = g / (g.abs() + 1e-8) + 0.01 * w0
    expected = w0 - 0.1 * (w0.norm() / u.norm()) * u
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    assert opt.param_groups[0]["step"] == 1


@pytest.mark.parametrize("bad", [[1.0, float("nan"), 0.0], [1.0, float("inf"), 0.0], [float("inf"), -float("inf"), 0.0]])
@pytest.mark.parametrize("cls", [Lamb, AdamW])
def test_non_finite_gradient_skips_the_step(cls, bad):
    w = torch.nn.Parameter(torch.ones(3))
    opt = cls([w], lr=0.1)
    w.grad = torch.tensor(bad)  # NaN; Inf; Infs of both signs, whose sum is NaN
    opt.step()
    assert opt.overflow and torch.equal(w.detach(), torch.ones(3))
    w.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()
    assert not opt.overflow and (w.detach() < 1).all()


def test_loss_watch_warns_once_per_rise_and_not_on_noise():
    g = torch.Generator().manual_seed(0)
    healthy = [0.5 * 0.98 ** k * (1 + 0.3 * (torch.rand(1, generator=g).item() - 0.5)) for k in range(200)]
    watch = LossWatch()
    assert not any(watch.check(25 * (k + 1), v) for k, v in enumerate(healthy))

    watch = LossWatch()
    losses = [1.0, 0.3, 0.1, 0.08, float("nan"), 0.12, 0.3, 0.5, 0.45, 0.1, 0.09, 0.4]
    said = {25 * (k + 1): watch.check(25 * (k + 1), v) for k, v in enumerate(losses)}
    assert [s for s, msg in said.items() if msg] == [175, 300]  # the first window over 2x the best, then after recovery
    assert "loss 0.3000 at step 175 is 3.8x its lowest (0.0800 at step 100)" in said[175]
    assert "train.lr" in said[175]


def test_warmup_then_cosine_to_the_floor():
    f = WarmupCosine(warmup=10, total=110, floor=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_ema_is_fp32_average_and_full_state_loads_into_the_model():
    cfg = small_cfg()
    model = RIN(cfg.model)
    ema = EMA(model, decay=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    state = ema.full_state()
    for n, p in before.items():
        assert torch.allclose(state[n], p + 0.1, atol=1e-6), n
    fresh = RIN(cfg.model)
    fresh.load_state_dict(state)  # strict: every key of the plain model is there
    assert all(v.dtype == torch.float32 for v in state.values())
    assert math.isclose(ema.decay, 0.9)


@contextlib.contextmanager
def autocast_as_on_a_gpu(dev):
    """The trainer's autocast, plus CUDA's autocast flag where the device is the CPU: DeepSpeed's
    engine.forward tests torch.is_autocast_enabled(), which reads that flag only, so on a GPU it
    sees the trainer's autocast and on the CPU it never does. Setting the flag lets a CPU run take
    the branch every GPU run takes."""
    was = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", True)
    try:
        with Precision("bf16", "test").autocast(dev):
            yield
    finally:
        torch.set_autocast_enabled("cuda", was)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_trainers_precision_reaches_the_model_inside_deepspeeds_forward(precision, one_process_group,
                                                                            monkeypatch):
    # A bf16 run whose matmuls DeepSpeed silently turned back to fp32 (its forward disables an
    # autocast it was not configured for) would train at half speed and report half its MFU.
    monkeypatch.setenv("LOCAL_RANK", "0")  # deepspeed.initialize wants it
    cfg = small_cfg("train.zero_stage=2", "train.global_batch=4")
    dev = device()
    torch.manual_seed(0)
    engine, _, _ = build_engine(RIN(cfg.model).to(dev), cfg, 1, precision=Precision(precision, "test"))
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
             for m in engine.module.modules() if isinstance(m, torch.nn.Linear)]
    x0 = torch.rand(4, 3, 16, 16, device=dev) * 2 - 1
    with autocast_as_on_a_gpu(dev) if precision == "bf16" else contextlib.nullcontext():
        loss, _ = training_loss(engine, x0, cfg.diffusion, labels=torch.tensor([0, 1, 2, 3], device=dev))
    engine.backward(loss)
    engine.step()
    for h in hooks:
        h.remove()
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen and set(seen) == {want}, f"{precision} run: Linear outputs {sorted(map(str, set(seen)))}"
    assert engine.was_step_applied()


def test_zero_still_skips_a_non_finite_lamb_step(one_process_group, monkeypatch):
    # Under ZeRO, LAMB leaves the finite check to DeepSpeed (its own would cost a collective and a
    # host sync per tensor): a NaN gradient must still never reach the weights.
    monkeypatch.setenv("LOCAL_RANK", "0")
    # Glorot read/write outputs: tiny's zero ones leave the latents' path without a gradient at first.
    cfg = small_cfg("train.zero_stage=2", "train.global_batch=4", "train.optimizer=lamb", "model.rw_out_init=glorot")
    torch.manual_seed(0)
    engine, opt, _ = build_engine(RIN(cfg.model), cfg, 1)
    assert isinstance(opt, Lamb) and opt.partitioned
    x0, labels = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 3])

    def weights():
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}

    before = weights()
    loss, _ = training_loss(engine, x0, cfg.diffusion, labels=labels)
    engine.backward(loss * float("nan"))
    engine.step()
    assert not engine.was_step_applied()
    assert all(torch.equal(w, before[n]) for n, w in weights().items())
    loss, _ = training_loss(engine, x0, cfg.diffusion, labels=labels)
    engine.backward(loss)
    engine.step()
    assert engine.was_step_applied()
    assert all(torch.isfinite(w).all() for w in weights().values())
    # (prev_mlp sits behind prev_norm's zero scale: no gradient at the first step)
    assert not [n for n, w in weights().items() if torch.equal(w, before[n]) and not n.startswith("prev_mlp.")]


def test_one_rank_zero0_skips_deepspeeds_gradient_allreduce_with_the_same_result(one_process_group, monkeypatch):
    # Over one rank DeepSpeed's all-reduce only flattens every gradient and copies it back:
    # build_engine turns it off there, and the weights must come out bit for bit as with it.
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = small_cfg("train.zero_stage=0", "train.global_batch=4", "train.optimizer=lamb")
    x0, labels = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 3])
    trained = {}
    for allreduce in (False, True):
        torch.manual_seed(0)
        engine, _, _ = build_engine(RIN(cfg.model), cfg, 1)
        assert engine.enable_backward_allreduce is False
        engine.enable_backward_allreduce = allreduce  # True: DeepSpeed's own path
        before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        for _ in range(2):
            loss, _ = training_loss(engine, x0, cfg.diffusion, labels=labels)
            engine.backward(loss)
            engine.step()
        trained[allreduce] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        assert any(not torch.equal(w, before[n]) for n, w in trained[allreduce].items())
    assert all(torch.equal(w, trained[True][n]) for n, w in trained[False].items())


@pytest.mark.parametrize("native", [False, True, None])
def test_auto_precision_on_the_cpu_follows_the_cpus_flags_never_a_timing(native, monkeypatch):
    # the same command must train in the same precision however loaded the machine is: a probe
    # that reads bf16 slower (as on a busy machine) changes nothing
    from rin_scale import engine, perf

    probed = []
    monkeypatch.setattr(perf, "native_cpu_bf16", lambda: native)
    monkeypatch.setattr(perf, "matmul_peak", lambda dtype, *a, **k: probed.append(dtype) or
                        (1e9 if dtype == torch.bfloat16 else 1e11))
    prec = engine.choose_precision("auto", torch.device("cpu"))
    assert prec.name == ("bf16" if native else "fp32") and not probed, (prec, probed)
    if native is False:
        assert "avx512_bf16" in prec.reason


def test_mfu_peak_is_the_best_probe_on_the_machine_and_mfu_never_exceeds_one(monkeypatch, tmp_path):
    from rin_scale import perf

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    readings = iter([4e11, 1e11])  # a quiet start, then one on a loaded machine
    monkeypatch.setattr(perf, "matmul_peak", lambda *a, **k: next(readings))
    cpu = torch.device("cpu")
    assert perf.device_peak(cpu, torch.float32)[0] == 4e11
    peak, source = perf.device_peak(cpu, torch.float32)
    assert peak == 4e11 and "best" in source
    mfu = perf.Mfu(1e11, source)
    first, warning = mfu(2e11)
    assert first == 1.0 and "train.peak_tflops" in warning
    assert mfu(3e11) == (1.0, "") and mfu(5e10) == (0.5, "")


FAULTS_SCRIPT = """
import json, resource, sys, torch
from rin_scale.perf import keep_freed_memory
how = keep_freed_memory() if sys.argv[1] == "keep" else "as it is"
faults = []
for _ in range(48):  # a step's buffer: 48 MB, over glibc's largest mmap threshold (32 MB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(12 << 20).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"how": how, "faults": faults}))
"""


@pytest.mark.parametrize("mode", ["keep", "as it is", "user's MALLOC_ setting"])
def test_cpu_training_keeps_freed_memory_instead_of_faulting_it_in_every_step(mode, tmp_path):
    # train.set_up calls perf.keep_freed_memory on the CPU: glibc otherwise maps a buffer over its
    # mmap threshold afresh at each allocation and unmaps it on free, so every step faulted all
    # its pages in again (30,000-120,000 faults a cifar10 step). Once the heap holds the step's
    # buffers, allocating one takes no fault; glibc as it is faults every time. A user's own
    # MALLOC_* settings are left alone. The heap settles in a few iterations, how many depends on
    # where small allocations land (likely: torch's aligned request does not fit the hole the last
    # tensor left at first): 4-9 here, 10 on a CI machine; the last 16 of 48 leave a wide margin.
    script = tmp_path / "faults.py"
    script.write_text(FAULTS_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT)
    if mode == "user's MALLOC_ setting":
        env["MALLOC_TRIM_THRESHOLD_"] = str(2**30)
    out = subprocess.run([sys.executable, str(script), "as is" if mode == "as it is" else "keep"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.splitlines()[-1])
    late = res["faults"][32:]
    if mode == "keep":
        assert "keeps freed memory" in res["how"] and sum(late) == 0, res
    else:
        assert all(f > 0 for f in late), res  # a fresh mapping every time
        assert res["how"] == ("as it is" if mode == "as it is" else "glibc's malloc as set by MALLOC_TRIM_THRESHOLD_"), res


def test_zero_reduces_gradients_in_buckets_and_in_bf16_only_when_asked():
    from rin_scale.engine import ds_config

    cfg = small_cfg("train.zero_stage=2", "train.comm_bucket_mb=8")
    zero = ds_config(cfg, 2)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 2 * 2**20  # 8 MB of fp32
    assert zero["contiguous_gradients"] and zero["overlap_comm"] == torch.cuda.is_available()
    bf16 = Precision("bf16", "test")
    assert ds_config(cfg, 2, precision=bf16)["torch_autocast"]["lower_precision_safe_modules"] == []
    cfg = small_cfg("train.zero_stage=2", "train.reduce_bf16=true")
    assert "torch.nn.Linear" in ds_config(cfg, 2, precision=bf16)["torch_autocast"]["lower_precision_safe_modules"]
