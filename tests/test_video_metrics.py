"""The video frame measures (evals.video_metrics): per-frame error against the true continuation of
held-out clips beside the repeat-last-frame and data-mean baselines, and the digit recognised in
predicted frames; then the eval service conditioning on the held-out clips and writing the rows.

Stand-in: FVD's I3D is evals.extractors' small TorchScript stand-in (no pretrained weights here).
"""
import dataclasses

import pytest
import torch

from evals import video_metrics as vm
from test_evals_metrics import make_shards

FRAMES, COND = 8, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("video-metrics")
    return {"train": make_shards(str(d / "train"), "moving_digits", 40, frames=FRAMES, split="train"),
            "heldout": make_shards(str(d / "heldout"), "moving_digits", 6, frames=FRAMES),
            "dir": d}


def model_cfg():
    """The tiny_video model's config with frames = the clips it is scored on (eval.frames)."""
    from rin_scale.config import load_config, scored_clips

    return scored_clips(load_config("tiny_video")).model


def test_true_continuation_scores_zero_and_repeat_last_equals_its_baseline(data):
    ref = vm.video_reference(data["train"], data["heldout"], model_cfg(), 6)
    true = ref.clips[:, :, COND:]
    perfect = vm.VideoScore(ref, COND)
    perfect.update(true[:4], 0)
    perfect.update(true[4:], 4)  # batches in order, as the service samples them
    r = perfect.result()
    assert r["clips"] == 6 and len(r["frame_mse_per_frame"]) == FRAMES - COND
    assert r["frame_mse"] == 0 and all(v == 0 for v in r["frame_mse_per_frame"])
    assert 0 < r["frame_mse_repeat_last"] and 0 < r["frame_mse_data_mean"]
    assert r["frame_accuracy"] == r["frame_accuracy_real"] >= 0.5  # the classifier reads real moving digits

    repeat = vm.VideoScore(ref, COND)
    repeat.update(ref.clips[:, :, COND - 1:COND].expand_as(true), 0)
    r2 = repeat.result()
    assert r2["frame_mse"] == pytest.approx(r2["frame_mse_repeat_last"]) and r2["frame_mse_per_frame"] == r2[
        "frame_mse_repeat_last_per_frame"]
    assert r2["frame_mse_data_mean"] == r["frame_mse_data_mean"]  # baselines do not depend on the predictions

    noise = vm.VideoScore(ref, COND)
    noise.update(torch.rand_like(true) * 2 - 1, 0)
    assert noise.result()["frame_mse"] > max(r["frame_mse_repeat_last"], r["frame_mse_data_mean"])


def test_digit_crops_ignore_position_and_tint():
    frame = torch.full((2, 3, 16, 16), -1.0)
    frame[0, :, 2:8, 3:6] = 1.0  # a bright bar top-left
    frame[1, :, 9:15, 10:13] = 0.0  # the same bar, dimmer, bottom-right
    a, b = vm.digit_crops(frame)
    assert torch.allclose(torch.from_numpy(a), torch.from_numpy(b)) and a.max() == 1
    assert not vm.digit_crops(torch.full((1, 3, 16, 16), -1.0)).any()  # a blank frame: zeros, not an error


def test_service_conditions_on_held_out_clips_and_writes_the_rows(data, tmp_path):
    from evals.extractors import save_standin_i3d
    from evals.ledger import read
    from evals.service import Service
    from test_evals_service import make_run, snapshot, tb_scalars

    run = str(tmp_path / "run")
    i3d = save_standin_i3d(str(data["dir"] / "i3d.pt"))
    cfg, model = make_run(run, "tiny_video", [
        f"data.shards={data['train']}", f"eval.classifier_data={data['heldout']}", f"eval.i3d_weights={i3d}",
        f"eval.cache_dir={tmp_path / 'cache'}", "eval.num_samples=4", "eval.batch=2", "eval.steps=2",
        "eval.reference_samples=4"])
    snapshot(run, cfg, model, 10)
    svc = Service(run, progress=False)

    # The preset's model predicts one frame from two; the service extends each held-out clip's given
    # frames to the eval.frames = 8 of the clip and scores all 6 predicted frames.
    assert cfg.model.frames == COND + 1 and cfg.eval.frames == FRAMES
    clip_model = dataclasses.replace(cfg.model, frames=FRAMES)
    held, held_y = vm.read_clips(data["heldout"], clip_model, 100)
    held, held_y = held[vm.heldout_order(len(held), 4)], held_y[vm.heldout_order(len(held), 4)]
    train, _ = vm.read_clips(data["train"], clip_model, 4)
    assert torch.equal(svc.cond_frames, held[:, :, :COND])  # the held-out clips' given frames
    assert not torch.equal(svc.cond_frames, train[:, :, :COND])
    assert svc.run_once() == 3
    svc.close()

    rows = {r["metric"]: r for r in read(run)}
    mse, acc = rows["frame_mse"], rows["frame_accuracy"]
    true = held[:, :, COND:]
    want = vm.frame_errors(held[:, :, COND - 1:COND].expand_as(true), true).mean(0)  # repeat-last by hand
    assert mse["repeat_last_per_frame"] == pytest.approx(want.tolist(), abs=1e-5)
    assert mse["repeat_last"] == pytest.approx(float(want.mean()), abs=1e-6)
    assert mse["heldout_data"] == data["heldout"] and mse["clips"] == 4 and len(mse["per_frame"]) == FRAMES - COND
    assert mse["value"] > 0 and mse["data_mean"] > 0 and "training clips" in mse["data_mean_is"]
    assert 0 <= acc["value"] <= 1 and 0 <= acc["real"] <= 1 and rows["fvd"]["status"] == "ok"
    tb = tb_scalars(f"{run}/eval/tb")
    for tag in ("eval/frame_mse", "eval/frame_mse_repeat_last", "eval/frame_mse_data_mean", "eval/frame_accuracy",
                "eval/frame_mse_by_frame/6", "eval/fvd"):
        assert [s for s, _ in tb[tag]] == [10], tag


def test_demo_summary_line_carries_the_measures_and_both_baselines(capsys):
    from launch.demo import _video_summary

    ledger = [{"step": 10, "metric": "fvd", "value": 0.01},
              {"step": 10, "metric": "frame_mse", "value": 0.05, "per_frame": [0.04, 0.06], "repeat_last": 0.2,
               "data_mean": 0.1, "clips": 64},
              {"step": 10, "metric": "frame_accuracy", "value": 0.9, "real": 0.95}]
    final = {"fvd": 0.01, "frame_mse": 0.05, "frame_accuracy": 0.9}
    _video_summary(ledger, 10, final)
    assert final == {"fvd": 0.01, "frame_mse": 0.05, "frame_accuracy": 0.9, "frame_mse_repeat_last": 0.2,
                     "frame_mse_data_mean": 0.1, "frame_accuracy_real": 0.95}
    line = capsys.readouterr().out
    assert "per-frame MSE 0.0500" in line and "repeat-last-frame 0.2000" in line and "data mean frame 0.1000" in line
    assert "90.0% of predicted frames" in line and "pipeline check" in line
