"""The Fréchet distance, FID with the real InceptionV3 architecture, reference statistics, and the
sample classifier.

Stand-in: pretrained Inception weights cannot be downloaded here, so the InceptionV3 network is
torch-fidelity's architecture with weights saved from a random initialisation to a file and loaded
through the same path (eval.inception_weights) that loads the released weights file.
"""
import argparse

import numpy as np
import pytest
import scipy.linalg
import torch

from evals.frechet import FeatureStats, FrechetReference, frechet_distance


def make_shards(out: str, dataset: str, n: int, frames: int = 16, shard_size: int = 1000,
                split: str = "heldout") -> str:
    """The first n samples of a split of an embedded dataset, sharded by data_tools.shard."""
    from data_tools import embedded
    from data_tools.shard import build_items, make_shards as _make

    args = argparse.Namespace(embedded=dataset, split=split, resize=0, clip_frames=frames, kind="auto",
                              source=None)
    items, classes, kind = build_items(args)
    opts = {"kind": kind, "shard_size": shard_size, "shard_bytes": 0, "resize": 0, "format": None,
            "clip_frames": frames if dataset == "moving_digits" else 0, "frame_stride": 1,
            "source": f"embedded:{dataset}:{split}"}
    _make(items[:n], out, opts, embedded.CLASSES, "data", 1, progress=False)
    return out


def test_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # Rotating both Gaussians by the same orthogonal matrix changes nothing.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got = frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0, abs=1e-9)


def test_matches_the_definition_for_full_covariances():
    rng = np.random.default_rng(1)
    d = 24
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T / d, b @ b.T / d + np.eye(d) * 0.1
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    root = scipy.linalg.sqrtm(s1 @ s2)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(root))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)  # symmetric


def test_sample_statistics_converge_to_the_true_distance():
    rng = np.random.default_rng(2)
    d, n = 4, 200_000
    x = rng.normal(size=(n, d)) * np.array([1.0, 2.0, 0.5, 1.0])
    y = rng.normal(size=(n, d)) * np.array([1.0, 1.0, 1.0, 3.0]) + 0.5
    sx, sy = FeatureStats(d), FeatureStats(d)
    for i in range(0, n, 50_000):  # in batches, as the service accumulates them
        sx.update(torch.from_numpy(x[i:i + 50_000]))
        sy.update(torch.from_numpy(y[i:i + 50_000]))
    true = 4 * 0.25 + (0 + 1 + 0.5 ** 2 + 2 ** 2)  # ||mu||^2 + sum (sqrt v1 - sqrt v2)^2
    assert frechet_distance(*sx.mean_cov(), *sy.mean_cov()) == pytest.approx(true, rel=0.02)


def test_rank_deficient_covariances_give_a_finite_nonnegative_distance():
    rng = np.random.default_rng(3)
    d = 64
    few = rng.normal(size=(5, d))  # 5 samples in 64 dimensions: rank 4
    s = FeatureStats(d)
    s.update(torch.from_numpy(few))
    mu, sigma = s.mean_cov()
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6)
    other = FeatureStats(d)
    other.update(torch.from_numpy(rng.normal(size=(7, d)) + 1))
    value = frechet_distance(mu, sigma, *other.mean_cov())
    assert np.isfinite(value) and value > d * 0.9  # the means alone are sqrt(d) apart
    # The reference side's square root is reused across distances.
    ref = FrechetReference(*other.mean_cov())
    assert ref.distance(mu, sigma) == pytest.approx(value, rel=1e-9)
    # With the rows kept (fewer than the dimensions), the small Gram matrix gives the same distance.
    assert s.rows().shape == (5, d)
    assert ref.distance(mu, sigma, s.rows()) == pytest.approx(value, rel=1e-9)
    low = FrechetReference(*other.mean_cov(), rows=other.rows())  # the root from the Gram matrix too
    assert np.allclose(low.root, ref.root, atol=1e-8)
    assert low.distance(mu, sigma, s.rows()) == pytest.approx(value, rel=1e-8)


def test_mismatched_statistics_are_a_clear_error():
    with pytest.raises(ValueError, match="different extractors"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(FloatingPointError, match="non-finite"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from evals.extractors import save_random_inception

    return save_random_inception(str(tmp_path_factory.mktemp("inception") / "inception-random.pth"))


def digit_images(n: int, split="heldout") -> torch.Tensor:
    from data_tools.embedded import digits

    imgs = [torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1 for _, a, _ in digits(split)]
    return torch.stack(imgs[:n])


def test_fid_is_near_zero_for_the_same_set_and_grows_with_a_shift(inception_file):
    from evals.extractors import Extractor
    from rin_scale.config import EvalConfig

    ext = Extractor("fid", EvalConfig(inception_weights=inception_file))
    assert ext.id.startswith("inception-v3-2015-12-05-")
    real = digit_images(4)

    def stats(x):
        s = ext.new_stats()  # float64 statistics of InceptionV3's 2048-d pool features
        s.update(x[:2])
        s.update(x[2:])
        return s

    base = stats(real)
    ref = FrechetReference(*base.mean_cov(), rows=base.rows())
    same = ref.distance(*base.mean_cov(), base.rows())
    shifted = [stats((real + shift).clamp(-1, 1)) for shift in (0.3, 0.9)]
    small, large = (ref.distance(*s.mean_cov(), s.rows()) for s in shifted)
    assert abs(same) < 1e-3 * small
    assert 0 < small < large
    # The kept rows are exactly what the statistics accumulated.
    mu, sigma = shifted[0].mean_cov()
    rows = shifted[0].rows()
    assert rows.shape == (4, 2048) and np.allclose(rows.mean(0), mu) and np.allclose(np.cov(rows.T), sigma)


def test_a_weights_file_of_the_wrong_kind_is_one_clear_error(tmp_path):
    from evals.extractors import ExtractorError, I3DFeatures, InceptionFeatures

    bad = tmp_path / "not-inception.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(ExtractorError, match="is not torch-fidelity's InceptionV3 state dict"):
        InceptionFeatures(str(bad))
    with pytest.raises(ExtractorError, match="no such file"):
        InceptionFeatures(str(tmp_path / "missing.pth"))
    with pytest.raises(ExtractorError, match="is not a TorchScript I3D"):
        I3DFeatures(str(bad))


def test_stand_in_i3d_has_the_stylegan_v_interface(tmp_path):
    from evals.extractors import I3DFeatures, save_standin_i3d

    i3d = I3DFeatures(save_standin_i3d(str(tmp_path / "i3d.pt")))
    videos = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    feats = i3d(videos)
    assert feats.shape == (2, 400) and torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])


def test_reference_statistics_are_cached_by_data_and_extractor(tmp_path, inception_file):
    from evals.extractors import Extractor
    from evals.reference import main as reference_main
    from rin_scale.config import load_config

    shards = make_shards(str(tmp_path / "digits"), "digits", n=8)
    args = ["tiny", f"data.shards={shards}", f"eval.inception_weights={inception_file}",
            f"eval.cache_dir={tmp_path}/cache", "eval.reference_samples=4", "eval.batch=4"]
    assert reference_main(args) == 0
    files = list((tmp_path / "cache" / "reference").iterdir())
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    from evals.reference import reference_stats

    cfg = load_config(None, args)
    mu, sigma, n, url, rows = ref = reference_stats(cfg, Extractor("fid", cfg.eval), progress=False)
    assert (ref.n, ref.url) == (n, url)
    assert url == str(files[0]) and files[0].stat().st_mtime_ns == stamp  # read, not recomputed
    assert n == 4 and mu.dtype == np.float64 and sigma.shape == (2048, 2048)
    assert np.allclose(sigma, sigma.T) and rows.shape == (4, 2048)  # rows kept: fewer than dimensions


def test_a_subset_of_a_shard_folder_has_its_own_reference_key(tmp_path):
    from evals.reference import cache_key
    from rin_scale.config import load_config

    folder = make_shards(str(tmp_path / "digits"), "digits", n=8, shard_size=4)  # two shards, one manifest
    m = load_config("tiny").model
    keys = [cache_key(u, "inception", m) for u in (folder, f"{folder}/data-{{000000..000001}}.tar",
                                                   f"{folder}/data-{{000000..000000}}.tar")]
    assert keys[0] == keys[1] and keys[2] != keys[0]  # the same samples share statistics; a subset does not


def test_classifier_recognises_real_digits_and_not_mislabelled_ones(tmp_path):
    from evals.classifier import SampleClassifier, balanced_labels
    from rin_scale.config import load_config

    cfg = load_config("tiny")
    clf = SampleClassifier(make_shards(str(tmp_path / "held"), "digits", n=200), cfg.model)
    assert clf.n == 200 and clf.real_accuracy > 0.85
    from data_tools.embedded import digits

    train = [(torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1, y) for _, a, y in digits("train")][:300]
    x = torch.stack([t for t, _ in train])
    y = torch.tensor([label for _, label in train])
    assert clf.accuracy(x, y) > 0.85  # unseen real digits, right labels
    assert clf.accuracy(x, (y + 1) % 10) < 0.1  # the same images "conditioned" on the wrong class
    assert balanced_labels(25, 10).bincount().tolist() == [3] * 5 + [2] * 5


def test_generated_weights_live_in_the_users_own_cache(tmp_path, monkeypatch):
    import os
    import stat

    from evals import extractors

    monkeypatch.setenv("HOME", str(tmp_path))
    made = []

    def make(path):
        made.append(path)
        torch.save({}, path)

    path = extractors.user_cache_file("w.pth", make)
    folder = tmp_path / ".cache" / "rin_scale"
    assert path == str(folder / "w.pth") and os.path.isfile(path)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert os.listdir(folder) == ["w.pth"]  # written beside it under a temporary name, then renamed
    assert extractors.user_cache_file("w.pth", make) == path and len(made) == 1  # made once
    monkeypatch.setattr(extractors, "save_random_inception", lambda p, seed: make(p))
    assert extractors._random_inception_file() == str(folder / "inception-random-seed0.pth")
