"""eval.metrics against closed forms, hand computations and the published implementations."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from eval import metrics as M
from tests.helpers import import_audioldm_eval


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def _sample(mu, cov, n, seed):
    return np.random.default_rng(seed).multivariate_normal(mu, cov, size=n)


def test_frechet_distance_of_sampled_gaussians_matches_closed_form():
    # S1 = Q diag(a) Q', S2 = Q diag(b) Q' commute, so Tr((S1 S2)^1/2) = sum sqrt(a_i b_i).
    d, n = 6, 200_000
    q = _rotation(d, 0)
    a, b = np.linspace(0.5, 3.0, d), np.linspace(2.0, 0.2, d)
    mu1, mu2 = np.arange(d) * 0.1, np.arange(d) * -0.2 + 0.5
    closed = float(((mu1 - mu2) ** 2).sum() + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum())
    x, y = _sample(mu1, q @ np.diag(a) @ q.T, n, 1), _sample(mu2, q @ np.diag(b) @ q.T, n, 2)
    assert M.frechet_distance_from_embeddings(x, y) == pytest.approx(closed, rel=0.02)


def test_frechet_distance_non_commuting_population_matches_eigenvalue_form():
    # Independent route: the eigenvalues of the (non-symmetric) product S1 S2 are real, >= 0.
    d = 5
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


@pytest.mark.parametrize("n,d", [(300, 16), (12, 64)])
def test_identical_sets_give_zero(n, d):
    x = np.random.default_rng(0).standard_normal((n, d)) * 5 + 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.FewSamplesWarning)
        fd = M.frechet_distance_from_embeddings(x, x.copy())
    assert 0.0 <= fd < 1e-8 * np.trace(np.cov(x, rowvar=False))


def test_few_samples_path_equals_covariance_path_and_warns():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((20, 64)), rng.standard_normal((30, 64)) * 1.5 + 0.3
    with pytest.warns(M.FewSamplesWarning, match="20 samples of 64-d") as caught:
        fast = M.frechet_distance_from_embeddings(x, y)
    import pickle  # a warning turned error under -W error crosses a job's process boundary pickled

    w = caught[0].message
    assert str(pickle.loads(pickle.dumps(w))) == str(w) and pickle.loads(pickle.dumps(w)).n == 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.FewSamplesWarning)
        full = M.frechet_distance(*M.gaussian_stats(x), *M.gaussian_stats(y))
    assert fast == pytest.approx(full, rel=1e-7)


def test_agrees_with_frechet_audio_distance_implementation():
    from frechet_audio_distance import FrechetAudioDistance

    import siren  # noqa: F401  (offline HF settings before laion_clap, which frechet_audio_distance imports)

    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32))
    y = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32)) + 0.5
    mu1, s1 = M.gaussian_stats(x)
    mu2, s2 = M.gaussian_stats(y)
    # The method never touches `self` (no model is built): call it unbound.
    theirs = FrechetAudioDistance.calculate_frechet_distance(None, mu1, s1, mu2, s2)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(float(theirs), rel=1e-8)
    assert M.frechet_distance_from_embeddings(x, y) == pytest.approx(float(theirs), rel=1e-8)


def test_near_singular_covariances_give_real_nonnegative_distance():
    import scipy.linalg

    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 64))  # rank-19 covariance in 64-d
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    # The failure mode being guarded: sqrtm of the singular product has imaginary parts and the
    # textbook formula comes out negative for two identical sets.
    root = scipy.linalg.sqrtm(s @ s)
    root = root[0] if isinstance(root, tuple) else root
    textbook = float(2 * np.trace(s) - 2 * np.trace(root).real)
    assert np.iscomplexobj(root) and textbook < 0
    fd = M.frechet_distance(mu, s, mu, s)
    assert isinstance(fd, float) and 0.0 <= fd < 1e-6


def test_non_psd_covariance_is_an_error():
    s = np.diag([1.0, 2.0, -0.5])
    with pytest.raises(ValueError, match="not positive semi-definite"):
        M.frechet_distance(np.zeros(3), s, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance_from_embeddings(np.full((5, 3), np.nan), np.ones((5, 3)))


def test_kl_matches_hand_computation():
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.5, 0.3])
    by_hand = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    # logits are log-probabilities plus any per-row constant
    kl = M.kl_divergence(np.log(p)[None] + 7.0, np.log(q)[None] - 3.0, eps=0.0)
    assert kl.shape == (1,) and kl[0] == pytest.approx(by_hand, rel=1e-12)
    with_eps = (0.5 * math.log(0.5 / (0.2 + 1e-6)) + 0.3 * math.log(0.3 / (0.5 + 1e-6))
                + 0.2 * math.log(0.2 / (0.3 + 1e-6)))
    assert M.kl_divergence(np.log(p)[None], np.log(q)[None], eps=1e-6)[0] == pytest.approx(with_eps, rel=1e-12)
    # direction: KL(p||q) != KL(q||p) here
    assert M.kl_divergence(np.log(q)[None], np.log(p)[None], eps=0.0)[0] != pytest.approx(by_hand, rel=1e-3)


def _audioldm_kl(monkeypatch, ref: np.ndarray, gen: np.ndarray) -> dict:
    """audioldm_eval's own calculate_kl (prediction = generated, target = reference), pairs by file name."""
    ae = import_audioldm_eval(monkeypatch)
    names = [f"{i}.wav" for i in range(len(ref))]
    return ae.calculate_kl({"logits": torch.tensor(gen), "file_path_": names},
                           {"logits": torch.tensor(ref), "file_path_": names}, "logits", True)[0]


def test_kl_of_identical_logits_is_zero_and_matches_audioldm_eval(monkeypatch):
    logits = np.random.default_rng(0).standard_normal((8, 527)) * 3
    assert np.abs(M.kl_divergence(logits, logits, eps=0.0)).max() < 1e-12
    assert np.abs(M.kl_divergence(logits, logits)).max() < 527 * 1e-6  # audioldm_eval's eps only
    other = np.random.default_rng(1).standard_normal((8, 527)) * 3
    theirs = _audioldm_kl(monkeypatch, logits, other)["kullback_leibler_divergence_softmax"]
    assert M.kl_divergence(logits, other).mean() == pytest.approx(theirs, rel=1e-10)


def test_kl_sigmoid_is_audioldm_evals_per_class_sum(monkeypatch):
    """audioldm_eval's calculate_kl, its sigmoid formulation, against ours in float64."""
    rng = np.random.default_rng(2)
    ref, gen = rng.standard_normal((6, 527)) * 4, rng.standard_normal((6, 527)) * 4
    theirs = _audioldm_kl(monkeypatch, ref, gen)["kullback_leibler_divergence_sigmoid"]
    ours = M.kl_sigmoid(ref, gen)
    assert ours.shape == (6,) and ours.mean() == pytest.approx(theirs, rel=1e-10)
    # one class, by hand: s(a) * (log s(a) - log(s(b) + eps))
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert M.kl_sigmoid(np.array([[2.0]]), np.array([[-1.0]]))[0] == pytest.approx(
        s(2.0) * (math.log(s(2.0)) - math.log(s(-1.0) + 1e-6)), rel=1e-12)


def test_inception_score_uniform_is_one():
    mean, std = M.inception_score(np.zeros((40, 527)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_and_even_is_number_of_classes():
    c, splits = 7, 10
    labels = np.arange(splits * c * 3) % c  # every chunk of the unshuffled order holds each class 3 times
    logits = 60.0 * np.eye(c)[labels]
    mean, std = M.inception_score(logits, splits=splits, seed=None)
    assert mean == pytest.approx(c, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_follows_audioldm_eval_shuffle_and_chunks(monkeypatch):
    """The peer's own calculate_isc, with 10 splits of 57 clips (uneven chunks, the shuffle's seed 2020)."""
    ae = import_audioldm_eval(monkeypatch)
    logits = np.random.default_rng(5).standard_normal((57, 11)) * 2
    want = ae.calculate_isc({"logits": torch.tensor(logits)}, "logits", rng_seed=2020, samples_shuffle=True,
                            splits=10)
    mean, std = M.inception_score(logits, splits=10, seed=2020)
    assert mean == pytest.approx(want["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(want["inception_score_std"], rel=1e-9)
    with pytest.raises(ValueError, match="10 splits"):
        M.inception_score(logits[:5])


def test_clap_score_is_mean_cosine_times_100():
    t = np.array([[1.0, 0.0], [0.0, 2.0]])
    a = np.array([[1.0, 1.0], [0.0, 3.0]])
    assert M.clap_cosine(t, a) == pytest.approx([1 / math.sqrt(2), 1.0])
    assert M.clap_score(t, a) == pytest.approx(100 * (1 / math.sqrt(2) + 1.0) / 2)
