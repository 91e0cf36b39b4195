"""rin_scale.routing: recorded read attention peaks where the interface differs, recording off is the
model's own forward bit for bit and leaves nothing behind, the CLI draws a PNG from a snapshot."""
import copy
import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import small_model_config
from rin_scale.diffusion import sample
from rin_scale.model import RIN
from rin_scale.routing import (colormap, record_attention, render, routing_image, routing_scalars,
                               sample_with_routing, step_indices, token_grid)


def _model(**kw):
    torch.manual_seed(0)
    return RIN(small_model_config(**kw)).eval()


def _inputs(m, b=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((b, *m.cfg.sample_shape), generator=g)
    cond = None
    if m.cfg.is_video and m.cfg.cond_frames:
        s = m.cfg.image_size
        cond = torch.randn((b, m.cfg.channels, m.cfg.cond_frames, s, s), generator=g)
    return x, torch.rand(b, generator=g), torch.tensor([1, 3])[:b], cond


def _focus_block0_read(m, region: torch.Tensor, strength: float = 5.0):
    """The interface is the positional embedding alone (stem zero, so LN(stem) = 0), non-zero only on
    the tokens in `region` (channel 0); block 0's read gets keys = that channel in each head's first
    dimension and a constant query along it, so the read scores are large only on the region."""
    attn = m.blocks[0].read.attn
    hd = attn.q.out_features // attn.heads
    with torch.no_grad():
        m.stem.weight.zero_()
        m.stem.bias.zero_()
        m.pos_emb.zero_()
        m.pos_emb[0, region, 0] = strength
        attn.q.weight.zero_()
        attn.q.bias.zero_()
        attn.kv.weight.zero_()
        attn.kv.bias.zero_()
        for h in range(attn.heads):
            attn.q.bias[h * hd] = 10.0
            attn.kv.weight[h * hd, 0] = 1.0  # k's first half of kv: keys


def test_read_attention_peaks_where_the_interface_differs():
    m = _model()
    g = m.cfg.image_size // m.cfg.patch_size  # 4x4 tokens
    grid = torch.zeros(g, g, dtype=torch.bool)
    grid[2:, 1:3] = True  # a 2x2 region, bottom middle
    region = grid.flatten().nonzero().flatten()
    _focus_block0_read(m, region)
    x, gamma, labels, _ = _inputs(m)
    with record_attention(m) as rec:
        m(x, gamma, labels)
    assert len(rec.records) == 1
    read = rec.records[0]["read"][0]
    share = read["map"]  # (B, tokens)
    assert torch.allclose(share.sum(-1), torch.ones(2), atol=1e-5)
    assert (share[:, region].sum(-1) > 0.99).all()
    assert set(share.argmax(-1).tolist()) <= set(region.tolist())
    assert (read["entropy"] < 0.6).all()  # focused: 4 of 16 tokens = log 4 / log 16 = 0.5
    assert torch.allclose(read["top10"], torch.full((2,), 0.5), atol=0.01)  # 2 tokens of 4 equal ones
    # block 1 was not crafted: its read is spread over the tokens
    assert (rec.records[0]["read"][1]["entropy"] > 0.8).all()

    # and the drawn map is bright exactly over the region (nearest upsampling of the token grid)
    heat = token_grid(m.cfg, share[0])
    assert heat.shape == (1, g, g)
    img = render(m.cfg, x.clamp(-1, 1), [{**rec.records[0], "t": 0.5}], panel=32, legend=False)
    assert img.dtype == np.uint8 and img.ndim == 3


def test_video_maps_are_per_token_frame():
    m = _model(frames=4, cond_frames=2, patch_frames=2, image_size=8, patch_size=2, num_classes=0)
    g, tf = 4, 2
    grid = torch.zeros(tf, g, g, dtype=torch.bool)
    grid[1, 0, 0] = grid[1, 0, 1] = True  # second token-frame (the predicted frames), top-left
    region = grid.flatten().nonzero().flatten()
    _focus_block0_read(m, region)
    x, gamma, _, cond = _inputs(m)
    with record_attention(m) as rec:
        m(x, gamma, None, None, cond)
    share = rec.records[0]["read"][0]["map"][0]
    heat = token_grid(m.cfg, share)
    assert heat.shape == (tf, g, g)
    assert heat[1, 0, :2].sum() > 0.99 and heat[0].sum() < 0.01
    wr = rec.records[0]["write"][0]
    assert torch.equal(wr["class"], torch.zeros_like(wr["class"]))  # unconditional: no class slot
    assert torch.allclose(wr["cond"], wr["time"])


def _dict_keys(m):
    return {name: (sorted(vars(mod)), {k: len(v) for k, v in vars(mod).items() if k.endswith("hooks")})
            for name, mod in m.named_modules()}


def test_recording_off_is_the_models_own_forward_and_leaves_nothing():
    m = _model()
    never = copy.deepcopy(m)  # never hooked
    x, gamma, labels, _ = _inputs(m)
    prev = torch.randn(2, m.cfg.num_latents, m.cfg.latent_dim, generator=torch.Generator().manual_seed(2))
    before = _dict_keys(m)
    ref_out, ref_z = never(x, gamma, labels, prev)

    with record_attention(m) as rec:
        rec.on = False
        out, z = m(x, gamma, labels, prev)
        assert torch.equal(out, ref_out) and torch.equal(z, ref_z)
        assert rec.records == []
        rec.on = True
        out_on, z_on = m(x, gamma, labels, prev)  # explicit softmax: the same up to rounding
        assert torch.allclose(out_on, ref_out, atol=1e-5) and torch.allclose(z_on, ref_z, atol=1e-5)
        assert len(rec.records) == 1
        r = rec.records[0]
        assert all(b is not None for b in r["read"] + r["write"])
        n = m.num_tokens
        for b in r["read"]:  # only reductions are kept: O(tokens) per example
            assert b["map"].shape == (2, n) and b["entropy"].shape == (2,)
        for b in r["write"]:
            assert b["cond"].shape == (2, n)

    out, z = m(x, gamma, labels, prev)
    assert torch.equal(out, ref_out) and torch.equal(z, ref_z)
    assert len(rec.records) == 1  # nothing records after the context
    assert _dict_keys(m) == before  # no attribute, hook or buffer left on any module
    for blk in m.blocks:
        assert "forward" not in vars(blk.read.attn) and "forward" not in vars(blk.write.attn)
    # the model holds no reference to the recorder (so none to what it recorded)
    ref = weakref.ref(rec)
    del rec, r
    gc.collect()
    assert ref() is None


def test_recording_survives_an_exception_and_refuses_nesting():
    m = _model()
    with pytest.raises(RuntimeError, match="already being recorded"):
        with record_attention(m):
            with record_attention(m):
                pass
    assert all("forward" not in vars(b.read.attn) for b in m.blocks)
    with pytest.raises(ValueError):
        with record_attention(m):
            raise ValueError("boom")
    assert all("forward" not in vars(b.write.attn) for b in m.blocks)


def test_sampling_with_routing_records_the_chosen_steps():
    from rin_scale.config import DiffusionConfig

    assert step_indices((0.9, 0.5, 0.1), 100) == [10, 50, 90]
    assert step_indices((0.9, 0.5, 0.1), 4) == [0, 2, 3]
    m = _model()
    dcfg = DiffusionConfig(sampler="ddim", sample_steps=10, target="v")
    noise = torch.randn(2, *m.cfg.sample_shape, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 4])
    plain = sample(m, noise.shape, dcfg, labels=labels, noise=noise)
    x, records = sample_with_routing(m, noise, dcfg, labels)
    assert torch.allclose(x, plain, atol=1e-4)
    assert [r["step"] for r in records] == [1, 5, 9]
    assert [round(r["t"], 2) for r in records] == [0.9, 0.5, 0.1]
    assert records[0]["x_t"].shape == (2, *m.cfg.sample_shape)

    # guidance doubles the batch; the conditional half is recorded
    x, records = sample_with_routing(m, noise, dcfg, labels, at=(0.5,), guidance=1.0)
    assert len(records) == 1 and records[0]["read"][0]["map"].shape[0] == 2

    s = routing_scalars(records)
    nb = m.cfg.num_blocks
    assert len(s) == 4 * nb
    for j in range(nb):
        assert 0 < s[f"routing/read_entropy/block{j}/t0.50"] <= 1 + 1e-6
        assert 0.1 - 1e-6 <= s[f"routing/read_top10/block{j}/t0.50"] <= 1 + 1e-6
        assert 0 < s[f"routing/write_entropy/block{j}/t0.50"] <= 1 + 1e-6
        assert 0 <= s[f"routing/write_cond/block{j}/t0.50"] <= 1


def test_routing_image_for_tensorboard():
    from rin_scale.config import DiffusionConfig

    m = _model()
    dcfg = DiffusionConfig(sampler="ddim", sample_steps=6)
    noise = torch.randn(2, *m.cfg.sample_shape, generator=torch.Generator().manual_seed(4))
    recs = []
    img = routing_image(m, noise, dcfg, torch.tensor([0, 1]), None, records=recs, panel=32)
    assert img.dim() == 3 and img.shape[0] == 3 and 0 <= img.min() and img.max() <= 1
    assert len(recs) == 3 and routing_scalars(recs)
    # video with given frames
    mv = _model(frames=4, cond_frames=2, patch_frames=2, num_classes=0)
    noise = torch.randn(1, *mv.cfg.sample_shape)
    cond = torch.rand(1, 3, 2, 8, 8) * 2 - 1
    img = routing_image(mv, noise, dcfg, None, cond, write="entropy", panel=32)
    assert img.shape[0] == 3 and img.shape[2] == 2 + 2 * (32 + 2)  # one column per token-frame


def test_colormap_ends():
    c = colormap(np.array([0.0, 0.5, 1.0]))
    assert c.shape == (3, 3) and c.dtype == np.uint8
    assert tuple(c[0]) == (0, 0, 4) and tuple(c[2]) == (252, 255, 164)
    assert c[1].sum() > c[0].sum()


def test_cli_draws_a_png_from_a_snapshot(tmp_path, capsys):
    from rin_scale import rundir
    from rin_scale.config import load_config
    from rin_scale.routing import main

    cfg = load_config("tiny", ["model.rw_out_init=glorot"])
    torch.manual_seed(0)
    model = RIN(cfg.model)
    run = str(tmp_path / "run")
    rundir.write_snapshot(run, 5, model.state_dict(), cfg, {})
    out = str(tmp_path / "routing.png")
    assert main([run, "--out", out, "--steps", "5", "--n", "2", "--class", "3", "--device", "cpu"]) == 0
    img = Image.open(out)
    assert img.mode == "RGB"
    blocks = cfg.model.num_blocks
    panel = 64  # 16x16 images are enlarged to 64
    assert img.size[0] == (2 + 2 * blocks) * (panel + 2) + 2
    table = capsys.readouterr().out
    assert "read_entropy" in table and len(table.strip().splitlines()) == 1 + 3 * blocks
    assert main([run, "--out", out, "--at", "2"]) == 2
    assert main([run, "--out", out, "--class", "99"]) == 2


def test_write_shares_name_the_time_and_class_slots():
    """Latent slots are [learned..., time, class]: mass on the second-to-last slot is the time share."""
    from rin_scale.routing import AttentionRecorder

    m = _model()  # class-conditional: 2 reserved slots of 8
    rec = AttentionRecorder(len(m.blocks), m.cfg.num_latents, m.num_reserved, True)
    n, lat = m.num_tokens, m.cfg.num_latents
    rec._store(0, "read", torch.full((1, 4, lat, n), 1.0 / n))
    p = torch.zeros(1, 4, n, lat)
    p[..., lat - 2] = 0.75  # time
    p[..., lat - 1] = 0.25  # class
    rec._store(0, "write", p)
    w = rec.records[0]["write"][0]
    assert torch.allclose(w["time"], torch.full((1, n), 0.75)) and torch.allclose(w["class"], torch.full((1, n), 0.25))
    assert torch.allclose(w["cond"], torch.ones(1, n))
    r = rec.records[0]["read"][0]
    assert torch.allclose(r["entropy"], torch.ones(1)) and torch.allclose(r["top10"], torch.full((1,), 2 / n))
