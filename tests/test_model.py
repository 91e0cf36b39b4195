"""The RIN model: shapes, the warm start, conditioning slots, hooks and sizes of the presets."""
import json

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from rin_scale import flops, info
from rin_scale.model import RIN, sinusoidal
from rin_scale.presets import get_preset

from conftest import small_model_config as small

torch.set_num_threads(1)


def test_image_output_shapes():
    m = RIN(small())
    out, z = m(torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([0, 4, 5]))
    assert out.shape == (3, 3, 8, 8)
    assert z.shape == (3, 8, 64)
    assert m.num_tokens == 16


def test_video_output_shapes_unconditioned_and_frame_conditioned():
    m = RIN(small(frames=4, patch_frames=2, num_classes=0))
    out, z = m(torch.randn(2, 3, 4, 8, 8), torch.rand(2))
    assert out.shape == (2, 3, 4, 8, 8) and z.shape == (2, 8, 64)

    # 3 clean + 3 noisy frames with 2-frame patches: a patch straddles both, the clip still tokenizes.
    m = RIN(small(frames=6, cond_frames=3, patch_frames=2, num_classes=0))
    assert m.num_tokens == 3 * 16
    x_t, cond = torch.randn(2, 3, 3, 8, 8), torch.randn(2, 3, 3, 8, 8)
    out, z = m(x_t, torch.rand(2), cond=cond)
    assert out.shape == x_t.shape and z.shape == (2, 8, 64)
    # The conditioning frames reach the output: they join the interface.
    gamma = torch.full((2,), 0.5)
    out1, _ = m(x_t, gamma, cond=cond)
    out2, _ = m(x_t, gamma, cond=cond + 1)
    assert not torch.allclose(out1, out2)

    # cond_mode=channels: the given frames are stacked onto each predicted frame's channels; only the
    # predicted frames are tokenized (one frame's grid here), and the given frames still reach the output.
    m = RIN(small(frames=3, cond_frames=2, cond_mode="channels", patch_frames=1, num_classes=0))
    assert m.num_tokens == 16 and m.stem.in_channels == 3 * 3
    x_t, cond = torch.randn(2, 3, 1, 8, 8), torch.randn(2, 3, 2, 8, 8)
    out1, _ = m(x_t, gamma, cond=cond)
    out2, _ = m(x_t, gamma, cond=cond.flip(2))  # the same frames in the other order
    assert out1.shape == x_t.shape and not torch.allclose(out1, out2)


def test_sin_cos_positions_are_fixed_codes_plus_a_learned_residual_rebuilt_not_saved():
    """model.pos_encoding=sin_cos_plus_learned (the authors' option): each place of a
    frame gets its own unit-scale code, the same at every time step; the learned part starts at
    zero; the codes are rebuilt from the config, not stored in checkpoints."""
    m = RIN(small(frames=4, patch_frames=2, num_classes=0, pos_encoding="sin_cos_plus_learned"))
    codes = m.pos_fixed[0]
    assert codes.shape == (2 * 16, 32)
    assert torch.equal(codes[:16], codes[16:])
    assert (torch.cdist(codes[:16], codes[:16]) + torch.eye(16)).min() > 0.5
    assert abs(codes.pow(2).mean().sqrt().item() - 0.5 ** 0.5) < 1e-6  # sin and cos: rms 1/sqrt(2)
    assert not m.pos_emb.any()
    assert "pos_fixed" not in m.state_dict()
    m2 = RIN(m.cfg)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 4, 8, 8)
    assert torch.equal(m(x, torch.full((2,), 0.5))[0], m2(x, torch.full((2,), 0.5))[0])


def test_kinetics_and_1024_presets_have_the_papers_token_counts():
    with torch.device("meta"):
        assert RIN(get_preset("kinetics600").model).num_tokens == 2048
        assert RIN(get_preset("imagenet1024").model).num_tokens == 16384
        assert RIN(get_preset("imagenet64_p4").model).num_tokens == 256


def test_imagenet256_preset_matches_the_papers_size():
    c = flops.count(get_preset("imagenet256").model)
    assert abs(c["gflops"] - 334) / 334 < 0.05  # paper: 334 GFLOPs
    assert abs(c["params"] - 410e6) / 410e6 < 0.05  # paper: 410M parameters


def test_bad_input_shapes_give_clear_errors():
    m = RIN(small(frames=6, cond_frames=3, patch_frames=2, num_classes=0))
    with pytest.raises(ValueError, match="predicted frames only"):
        m(torch.randn(2, 3, 6, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="conditioning frames"):
        m(torch.randn(2, 3, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"takes \(B, 3, 8, 8\)"):
        RIN(small())(torch.randn(2, 3, 16, 16), torch.rand(2))


def test_warm_start_leaves_latents_equal_to_z_init_at_initialization():
    torch.manual_seed(0)
    m = RIN(small())
    gamma, labels = torch.rand(4), torch.tensor([0, 1, 5, 3])
    z_init = torch.cat([m.latent_init.expand(4, -1, -1),
                        m.time_mlp(sinusoidal(gamma * 1000, m.time_features))[:, None],
                        m.class_emb(labels)[:, None]], dim=1)
    prev = torch.randn(4, 8, 64) * 5
    assert torch.equal(m.initial_latents(gamma, labels, prev), z_init)
    assert torch.equal(m.initial_latents(gamma, labels, None), z_init)
    # The whole forward does not depend on the previous latents at init ...
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(m(x, gamma, labels, prev)[0], m(x, gamma, labels, None)[0])
    # ... and does once the zero-initialized LayerNorm has learned something.
    with torch.no_grad():
        m.prev_norm.weight.fill_(0.1)
    assert not torch.allclose(m.initial_latents(gamma, labels, prev), z_init)


def test_every_parameter_gets_a_gradient_without_previous_latents():
    m = RIN(small(dropout=0.1, drop_path=0.1))
    out, z = m(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 5]))
    (out.square().mean() + z.square().mean()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert missing == []


def test_time_and_class_occupy_latent_slots():
    m = RIN(small(num_latents=8, num_classes=5))
    assert m.latent_init.shape[1] == 6  # 8 slots = 6 learned + time + class
    assert RIN(small(num_latents=8, num_classes=0)).latent_init.shape[1] == 7
    x, gamma = torch.randn(2, 3, 8, 8), torch.full((2,), 0.3)
    # Read and write start as identities (zero output projections), so at initialization the
    # latents, conditioning tokens included, do not reach the output yet ...
    a, _ = m(x, gamma, torch.tensor([1, 1]))
    assert torch.equal(a, m(x, torch.full((2,), 0.9), torch.tensor([2, 2]))[0])
    # ... and do once the projections have learned something.
    for block in m.blocks:
        torch.nn.init.normal_(block.read.attn.out.weight, std=0.02)
        torch.nn.init.normal_(block.write.attn.out.weight, std=0.02)
    a, _ = m(x, gamma, torch.tensor([1, 1]))
    b, _ = m(x, gamma, torch.tensor([2, 2]))
    c, _ = m(x, torch.full((2,), 0.6), torch.tensor([1, 1]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    # -1 (unlabelled, from the data pipeline) is the "no label" row.
    assert torch.equal(m(x, gamma, torch.tensor([-1, -1]))[0], m(x, gamma, torch.tensor([5, 5]))[0])


def test_checkpoint_hook_wraps_every_kth_block():
    m = RIN(small(num_blocks=4))
    x, gamma = torch.randn(2, 3, 8, 8), torch.rand(2)
    ref, _ = m(x, gamma)
    seen = []

    def ckpt(block, x, z):
        seen.append(block)
        return torch.utils.checkpoint.checkpoint(block, x, z, use_reentrant=False)

    m.checkpoint_fn, m.checkpoint_every = ckpt, 2
    out, _ = m(x, gamma)
    assert seen == [m.blocks[0], m.blocks[2]]
    assert torch.allclose(out, ref, atol=1e-6)


def test_attention_goes_through_sdpa(monkeypatch):
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    RIN(small(num_blocks=2, latent_layers=3))(torch.randn(1, 3, 8, 8), torch.rand(1))
    assert len(calls) == 2 * (1 + 3 + 1)  # read, 3 compute layers, write per block


def test_no_decay_names():
    m = RIN(small())
    names = m.no_decay_param_names()
    assert {"pos_emb", "latent_init", "class_emb.weight", "prev_norm.weight", "stem.bias",
            "blocks.0.read.norm.weight", "blocks.1.compute.0.mlp.fc1.bias"} <= names
    assert "blocks.0.compute.0.mlp.fc1.weight" not in names and "stem.weight" not in names
    assert names <= {n for n, _ in m.named_parameters()}


def test_cifar10_preset_has_31m_parameters():
    c = flops.count(get_preset("cifar10").model)
    assert abs(c["params"] - 31.0e6) / 31.0e6 < 0.02
    assert c["interface_tokens"] == 256 and c["latent_tokens"] == 128
    real = sum(p.numel() for p in RIN(get_preset("cifar10").model).parameters())
    assert real == c["params"]


def test_imagenet64_preset_has_the_released_size():
    c = flops.count(get_preset("imagenet64").model)  # RIN_SPEC.md: about 158M parameters at patch 8
    assert abs(c["params"] - 158e6) / 158e6 < 0.02 and c["interface_tokens"] == 64
    assert flops.count(get_preset("imagenet64_p4").model)["interface_tokens"] == 256


def test_flops_grow_with_resolution_and_batch():
    m = small(image_size=16)
    one, two = flops.count(m), flops.count(m, batch=2)
    assert two["gflops"] == pytest.approx(2 * one["gflops"], rel=1e-6)
    bigger = flops.count(small(image_size=32))
    assert bigger["gflops"] > one["gflops"] and bigger["params"] > one["params"]  # more positions


def test_info_cli_prints_one_json_object(capsys):
    assert info.main(["cifar10", "image_size=64", "model.patch_size=4"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["interface_tokens"] == 256 and d["latent_tokens"] == 128 and d["gflops"] > 0 and d["params"] > 30e6
    assert info.main(["cifar10", "model.patch_size=5"]) == 2
    err = capsys.readouterr().err
    assert "patch_size" in err and "\n" == err[-1] and err.count("\n") == 1


def test_cpu_dropout_keeps_1_minus_p_scaled_and_unbiased():
    from rin_scale.model import dropout

    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 2e-3
    assert torch.allclose(y[kept], torch.tensor(1 / 0.9), rtol=1e-5)  # p on a 2^-16 grid: 0.1000061
    assert abs(y.mean().item() - 1) < 3e-3
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the scaled mask
    torch.manual_seed(1)
    a = dropout(x, 0.3)
    torch.manual_seed(1)
    assert torch.equal(a, dropout(x, 0.3))  # the default generator: reproducible under manual_seed
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x
    xb = torch.ones(64, 64, dtype=torch.bfloat16)
    yb = dropout(xb, 0.1)  # bf16 as F.dropout: the scale rounded to bf16
    assert yb.dtype == torch.bfloat16 and set(yb.unique().tolist()) == set(torch.nn.functional.dropout(xb, 0.1).unique().tolist())
    m = RIN(small(dropout=0.5, drop_path=0.0))
    assert m.blocks[0].compute[0].mlp.dropout.p == 0.5


def test_cpu_bf16_attention_agrees_with_fp32_and_long_attention_stays_on_sdpa():
    import torch.nn.functional as F

    from rin_scale.model import CPU_MATH_ATTENTION_MAX, attend

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 16).bfloat16().requires_grad_() for n in (24, 40, 40))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32)
    g = torch.randn_like(ref)
    ref.backward(g)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # short: written out in bf16
        out = attend(q, k, v)
    out.backward(g.bfloat16())
    assert out.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16
    for a, b in [(out, ref), (q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)]:
        assert torch.allclose(a.float(), b, atol=3e-2, rtol=3e-2), (a.float() - b).abs().max()  # bf16: 8 bits
    assert torch.equal(attend(q32, k32, v32), ref)  # fp32: SDPA unchanged
    # Past CPU_MATH_ATTENTION_MAX score entries per head, SDPA's flash (it keeps no probabilities).
    q = torch.randn(1, 1, 1025, 8).bfloat16()
    k, v = (torch.randn(1, 1, CPU_MATH_ATTENTION_MAX // 1024, 8).bfloat16() for _ in range(2))
    assert torch.equal(attend(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_bf16_autocast_forward_backward_agrees_with_fp32():
    torch.manual_seed(0)
    m = RIN(small())
    for block in m.blocks:  # non-zero read/write outputs, so every path reaches the output
        torch.nn.init.normal_(block.read.attn.out.weight, std=0.05)
        torch.nn.init.normal_(block.write.attn.out.weight, std=0.05)
    x, gamma, labels = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2])
    out32, z32 = m(x, gamma, labels)
    out32.square().mean().backward()
    g32 = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, z16 = m(x, gamma, labels)
        out16.float().square().mean().backward()
    assert (out16.float() - out32).abs().max() < 0.05 * out32.abs().max()
    assert (z16.float() - z32).abs().max() < 0.05 * z32.abs().max()
    for n, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), n
        scale = g32[n].abs().max()
        assert (p.grad - g32[n]).abs().max() <= 0.1 * scale + 1e-6, n


@pytest.mark.parametrize("chunk,conv", [(0, 0), (5, 0), (5, 3)])
def test_stage_by_stage_checkpointing_gives_the_same_outputs_and_gradients(chunk, conv):
    from rin_scale.engine import by_stage

    torch.manual_seed(0)
    m = RIN(small(num_blocks=3, dropout=0.1, drop_path=0.1, conv_kernel_size=conv))
    for block in m.blocks:
        torch.nn.init.normal_(block.read.attn.out.weight, std=0.05)
        torch.nn.init.normal_(block.write.attn.out.weight, std=0.05)
        if conv:
            torch.nn.init.normal_(block.conv.pointwise.weight, std=0.05)
    x, gamma, labels = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2])
    prev = torch.randn(2, 8, 64)

    def run():
        m.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        out, z = m(x, gamma, labels, prev)
        (out.square().mean() + z.square().mean()).backward()
        return out.detach(), z.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    ref = run()
    calls = []

    def checkpoint(fn, *args):
        calls.append(fn.__name__)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    m.checkpoint_fn, m.checkpoint_every = by_stage(checkpoint, chunk_tokens=chunk), 1
    got = run()
    # per block: read, compute, the write in ceil(16 / 5) = 4 chunks of interface tokens, then the
    # conv over all of them (it mixes neighbours, so it must not run per chunk)
    writes = 4 if chunk else 1
    first_block = ["read_step", "compute_step"] + ["write_step"] * writes + ["conv_step"] * bool(conv)
    assert calls[:len(first_block)] == first_block
    assert len(calls) == 3 * (2 + writes + bool(conv))
    # Unchunked: the same operations, so the same bits. Chunked: each chunk's contribution to the
    # latents' gradients is summed in another order, so the two differ by rounding, which is
    # bounded by the tensor's scale (an element's own size can be far smaller after cancellation).
    pairs = [("out", got[0], ref[0]), ("latents", got[1], ref[1])] + [(n, got[2][n], ref[2][n]) for n in ref[2]]
    for n, a, b in pairs:
        if chunk:
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), n
        else:
            assert torch.equal(a, b), n
    # a no-grad pass checkpoints nothing, and its chunked write gives the same numbers
    calls.clear()
    with torch.no_grad():
        torch.manual_seed(1)
        out, _ = m(x, gamma, labels, prev)
    assert calls == [] and torch.allclose(out, ref[0], atol=1e-6)


@pytest.mark.parametrize("video", [False, True])
def test_interface_conv_starts_as_identity_and_mixes_only_grid_neighbours(video):
    """model.conv_kernel_size: the authors' depthwise conv over the token grid after each write.
    It must start as the identity (zero pointwise conv) and then mix each token with its kernel's
    neighbours on the grid the stem tokenized (rows of patches, frames for video)."""
    kw = dict(frames=4, cond_frames=1, patch_frames=2, num_classes=0) if video else {}
    m = RIN(small(conv_kernel_size=3, **kw))
    conv = m.blocks[0].conv
    x = torch.randn(2, m.num_tokens, 32, requires_grad=True)
    assert torch.equal(conv(x), x)
    torch.nn.init.normal_(conv.pointwise.weight, std=0.1)
    conv.norm = torch.nn.Identity()  # its statistics span the whole grid (as the authors'): look at the kernel
    conv(x)[:, 0].sum().backward()  # token 0: frame-patch 0, row 0, column 0
    touched = (x.grad.abs().sum((0, 2)) > 0).nonzero().flatten().tolist()
    # the 4x4 grid of 2x2 patches of an 8x8 image, row-major; video: 2 such grids, one per 2 frames
    assert touched == ([0, 1, 4, 5, 16, 17, 20, 21] if video else [0, 1, 4, 5])


def test_interface_conv_on_one_token_frame_is_2d_and_loads_3d_snapshots():
    """Given frames stacked on the channels (tiny_video) leave one token-frame: the conv is 2-D
    there (a 3-D one is several times slower on the CPU), and a snapshot written with the 3-D
    kernel loads and gives the same output: zero padding let only its middle time slice act."""
    m = RIN(small(frames=3, cond_frames=2, cond_mode="channels", patch_frames=1, num_classes=0,
                  conv_kernel_size=3))
    conv = m.blocks[0].conv
    assert isinstance(conv.depthwise, torch.nn.Conv2d)
    torch.nn.init.normal_(conv.pointwise.weight, std=0.1)
    x = torch.randn(2, m.num_tokens, 32)
    old = dict(m.state_dict())
    d3 = torch.nn.Conv3d(32, 32, 3, padding=1, groups=32)
    d3.weight.data.normal_()
    old["blocks.0.conv.depthwise.weight"], old["blocks.0.conv.depthwise.bias"] = d3.weight.data, d3.bias.data
    old["blocks.0.conv.pointwise.weight"] = conv.pointwise.weight.data[:, :, None]
    grid = conv.grid
    h = rearrange(x, "b n d -> b d n").reshape(2, 32, 1, *grid)
    want = x + rearrange(conv.pointwise(F.silu(conv.norm(d3(h)[:, :, 0]))).flatten(2), "b d n -> b n d")
    m.load_state_dict(old)
    torch.testing.assert_close(conv(x), want)
