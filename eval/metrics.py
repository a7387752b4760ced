"""The five Table-1 metrics on arrays (no backbone code here): FD, FAD, KL, IS, CLAP score.

Protocol of AudioLDM-style evaluation (paper appendix C.1; audioldm_eval, frechet_audio_distance):

- FD / FAD: Frechet distance between Gaussians fitted to two sets of embeddings (PANNs 2048-d per
  clip for FD, VGGish 128-d per 0.96 s frame pooled over the set for FAD), in float64 with a
  checked matrix square root (``frechet_distance``).
- KL: softmax over the 527 PANNs logits, paired by clip id, KL(ref || gen) per clip, mean over clips.
  audioldm_eval also reports a "sigmoid" KL (``kl_sigmoid``): the same sum over classes with
  per-class sigmoid probabilities, which do not sum to one (not a divergence between distributions).
- IS: softmax over the same logits of the generated set, ``splits`` chunks after a seeded shuffle,
  exp(mean_i KL(p_i || mean p)) per chunk; mean and std over chunks.
- CLAP score: mean cosine(text, audio) x 100.
"""
from __future__ import annotations

import warnings

import numpy as np

# audioldm_eval's KL adds this to the generated-side probabilities inside the log (the "AudioGen
# formulation", torch.nn.functional.kl_div((p_gen + EPS).log(), p_ref)). Published KL numbers carry it.
KL_EPS = 1e-6
# audioldm_eval's calculate_isc(..., splits=10, samples_shuffle=True, rng_seed=2020).
IS_SPLITS = 10
IS_SEED = 2020


class FewSamplesWarning(UserWarning):
    """Fewer samples than embedding dimensions: the covariance is rank-deficient and FD is biased."""

    def __init__(self, what: str, n: int, d: int):
        self.what, self.n, self.d = what, n, d
        super().__init__(f"Frechet distance from {n} samples of {d}-d embeddings ({what}): the covariance has rank "
                         f"<= {n - 1} < {d}, so the distance carries a large bias that depends on N; compare only "
                         "numbers computed on the same number of clips")

    def __reduce__(self):  # pickled or copied (an error under -W error crossing a process): rebuilt from its fields
        return type(self), (self.what, self.n, self.d)


def _check_embeddings(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{what}: need embeddings [N >= 2, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: embeddings contain NaN or inf")
    if x.shape[0] <= x.shape[1]:
        warnings.warn(FewSamplesWarning(what, *x.shape), stacklevel=3)
    return x


def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (np.cov, rowvar=False) of embeddings ``x`` [N, D], in float64."""
    x = _check_embeddings(x, "embeddings")
    return x.mean(0), np.cov(x, rowvar=False)


def _psd_eigh(a: np.ndarray, what: str, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric PSD matrix; roundoff negatives clipped, real negatives an error."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    floor = -rtol * max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    if w.min(initial=0.0) < floor:
        raise ValueError(f"{what} is not positive semi-definite: eigenvalue {w.min():.3e} "
                         f"(largest {np.abs(w).max():.3e}); the embeddings or statistics are corrupt")
    return np.clip(w, 0.0, None), v


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     rtol: float = 1e-6) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), in float64.

    Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the product in the second form is
    symmetric PSD, so both square roots come from ``eigh`` and are real by construction (no
    ``scipy.linalg.sqrtm``, which returns complex parts on near-singular products). Eigenvalues
    below zero by roundoff (|lambda| <= rtol * max) are clipped; larger ones are an error. A
    result below zero by roundoff is clipped to 0, a clearly negative one is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    for name, a in [("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)]:
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf")
    w1, v1 = _psd_eigh(s1, "sigma1", rtol)
    sqrt_s1 = (v1 * np.sqrt(w1)) @ v1.T
    _psd_eigh(s2, "sigma2", rtol)
    w, _ = _psd_eigh(sqrt_s1 @ s2 @ sqrt_s1, "S1^(1/2) S2 S1^(1/2)", rtol)
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(w).sum())
    scale = float(diff @ diff + np.trace(s1) + np.trace(s2))
    # sqrt amplifies roundoff on (near-)zero eigenvalues: each can add ~sqrt(eps * lambda_max).
    tol = rtol * scale + s1.shape[0] * np.sqrt(np.finfo(np.float64).eps * float(w.max(initial=0.0)))
    return _nonnegative(fd, scale, tol)


def _nonnegative(fd: float, scale: float, tol: float) -> float:
    if fd < -tol:
        raise ValueError(f"Frechet distance came out negative ({fd:.6g}, tolerance {tol:.3g}): numerical failure")
    return max(fd, 0.0)


def frechet_distance_from_embeddings(a: np.ndarray, b: np.ndarray, rtol: float = 1e-6,
                                     names: tuple[str, str] = ("set a", "set b")) -> float:
    """FD between the Gaussians fitted (mean, unbiased covariance) to embedding sets a [N_a, D] and b [N_b, D].

    With more samples than dimensions this is ``frechet_distance`` on the two covariances. With
    fewer (e.g. 975 AudioCaps clips in PANNs' 2048-d), the same number comes from the samples
    directly: with X, Y the centred sets scaled by 1/sqrt(N-1), S1 = X'X and S2 = Y'Y, and the
    nonzero eigenvalues of S1 S2 are the squared singular values of X Y', so
    Tr((S1 S2)^(1/2)) = ||X Y'||_* (nuclear norm): an SVD of an N_a x N_b matrix, no matrix square root.
    """
    a, b = _check_embeddings(a, names[0]), _check_embeddings(b, names[1])
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if min(a.shape[0], b.shape[0]) > a.shape[1]:
        return frechet_distance(*gaussian_stats(a), *gaussian_stats(b), rtol)
    mu1, mu2 = a.mean(0), b.mean(0)
    x, y = (a - mu1) / np.sqrt(a.shape[0] - 1), (b - mu2) / np.sqrt(b.shape[0] - 1)
    s = np.linalg.svd(x @ y.T, compute_uv=False)
    diff = mu1 - mu2
    scale = float(diff @ diff + (x * x).sum() + (y * y).sum())
    return _nonnegative(scale - 2.0 * float(s.sum()), scale, rtol * scale)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray, eps: float = KL_EPS) -> np.ndarray:
    """Per-row KL(softmax(p) || softmax(q)) [N], in float64.

    ``eps`` > 0 reproduces audioldm_eval: sum p * (log p - log(q + eps)); eps = 0 is the exact KL.
    For the reported KL(ref || gen), p are the reference clips' logits and q the generated ones.
    """
    p_logits, q_logits = np.asarray(p_logits), np.asarray(q_logits)
    if p_logits.shape != q_logits.shape or p_logits.ndim != 2:
        raise ValueError(f"KL needs paired logits of equal shape [N, C], got {p_logits.shape} and {q_logits.shape}")
    log_p = _log_softmax(p_logits)
    log_q = _log_softmax(q_logits) if eps == 0 else np.log(np.exp(_log_softmax(q_logits)) + eps)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def kl_sigmoid(p_logits: np.ndarray, q_logits: np.ndarray, eps: float = KL_EPS) -> np.ndarray:
    """Per-row sum_c s(p)_c * (log s(p)_c - log(s(q)_c + eps)) [N], s = sigmoid, in float64.

    audioldm_eval's ``kullback_leibler_divergence_sigmoid`` (torch ``kl_div`` on sigmoid outputs,
    summed over classes, mean over clips); p are the reference clips' logits, q the generated ones.
    """
    p_logits, q_logits = np.asarray(p_logits, np.float64), np.asarray(q_logits, np.float64)
    if p_logits.shape != q_logits.shape or p_logits.ndim != 2:
        raise ValueError(f"KL needs paired logits of equal shape [N, C], got {p_logits.shape} and {q_logits.shape}")
    log_p = -np.logaddexp(0.0, -p_logits)  # log sigmoid, stable for large |logit|
    return (np.exp(log_p) * (log_p - np.log(1.0 / (1.0 + np.exp(-q_logits)) + eps))).sum(-1)


def folder_order(file_names: list[str]) -> list[int]:
    """The indices that put clips in the order audioldm_eval reads a folder (``sorted(os.listdir)``): its IS
    shuffles and splits from that order, so the same clips in manifest order fall into other splits."""
    return sorted(range(len(file_names)), key=file_names.__getitem__)


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS, seed: int | None = IS_SEED) -> tuple[float, float]:
    """IS over softmax(logits) [N, C]: mean and std over ``splits`` chunks (shuffled with ``seed``).

    Chunk i is rows [i*N//splits, (i+1)*N//splits) of the permuted set, as audioldm_eval.
    seed=None keeps the given order.
    """
    logits = np.asarray(logits, np.float64)
    n = logits.shape[0]
    if logits.ndim != 2 or n < splits:
        raise ValueError(f"IS with {splits} splits needs logits [N >= {splits}, C], got shape {logits.shape}")
    if seed is not None:
        logits = logits[np.random.RandomState(seed).permutation(n)]
    log_p = _log_softmax(logits)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        log_marginal = np.log(p[lo:hi].mean(0, keepdims=True))
        scores.append(float(np.exp((p[lo:hi] * (log_p[lo:hi] - log_marginal)).sum(-1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def clap_cosine(text_emb: np.ndarray, audio_emb: np.ndarray) -> np.ndarray:
    """Per-pair cosine similarity [N] between paired text and audio embeddings [N, D] (normalised here)."""
    t, a = np.asarray(text_emb, np.float64), np.asarray(audio_emb, np.float64)
    if t.shape != a.shape or t.ndim != 2:
        raise ValueError(f"CLAP score needs paired embeddings of equal shape [N, D], got {t.shape} and {a.shape}")
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    return (t * a).sum(-1)


def clap_score(text_emb: np.ndarray, audio_emb: np.ndarray) -> float:
    """Mean text-audio cosine x 100 (the Table-1 convention)."""
    return float(100.0 * clap_cosine(text_emb, audio_emb).mean())
