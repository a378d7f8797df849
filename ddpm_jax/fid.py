"""FID, KID and Inception Score of the FID InceptionV3: statistics, distances, weights, caching.

* `frechet_distance` is pytorch-fid's `calculate_frechet_distance` (float64, scipy sqrtm, eps
  offset when the covariance product is singular, imaginary-part check).
* `kernel_inception_distance` is the unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3 averaged over random subsets, as in torch-fidelity / clean-fid
  (100 subsets of 1000 by default); returns (mean, std) like torch-fidelity (std with ddof=0).
* `inception_score` is torch-fidelity's `isc_features_to_metric` on the network's 1008 logits
  without the classifier bias ('logits_unbiased'): rows shuffled with RandomState(2020), 10
  contiguous splits, exp(mean KL(p(y|x) || p(y))) per split in float64; (mean, std with ddof=0).
* `FeatureStats` accumulates mean/covariance in float64 from a stream of batches and keeps a
  bounded uniform random sample of the raw features for KID.
* `inception_weights_path` finds (or downloads once and converts) the pytorch-fid weights.
* `reference_stats` caches dataset statistics as `<cache_dir>/fid_stats/<key>.npz`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.request
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
import scipy.linalg
import scipy.special
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import inception

# The pytorch-fid release asset. Its SHA-256 (the file name carries its first 8 hex digits, the
# torch.hub convention) and size are the values several independent projects pin for this file.
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_BYTES = 95_628_359
WEIGHTS_PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_NPZ_NAME = "pt_inception-2015-12-05.npz"
CACHE_ENV = "DDPM_JAX_CACHE"
OFFLINE_ENV = "DDPM_JAX_OFFLINE"
DOWNLOAD_TIMEOUT_S = 20.0
# Bumped whenever the feature pipeline changes (weights, resize, network) so stale cached
# reference statistics are never mixed with new features.
FEATURES_VERSION = "ptinc20151205-bilinear299"
KID_REFERENCE_FEATURES = 10_000


class WeightsUnavailableError(RuntimeError):
    """The FID Inception weights are not on disk and could not be downloaded."""


# ---------------------------------------------------------------------------------------------
# Distances


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 (pytorch-fid's formula)."""
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: {mu1.shape}/{mu2.shape}, {sigma1.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (e.g. fewer samples than dimensions): regularise both covariances.
        warnings.warn(
            f"FID: singular covariance product; adding {eps} to the diagonals", stacklevel=2
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # scipy warns on (near-)singular inputs; the finiteness check above is what we act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(a)


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between equal-size samples under k(a, b) = (a.b / d + 1)^3 (float64)."""
    x, y = np.float64(x), np.float64(y)
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    feats1: np.ndarray,
    feats2: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and std of the unbiased polynomial MMD^2 over random subsets.

    Each subset draws `subset_size` rows without replacement from each set, clipped to the
    smaller sample count. Deterministic for a given `seed`.
    """
    n1, n2 = len(feats1), len(feats2)
    m = min(subset_size, n1, n2)
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {n1} and {n2}")
    rng = np.random.default_rng(seed)
    mmds = np.array(
        [
            polynomial_mmd2(
                feats1[rng.choice(n1, m, replace=False)], feats2[rng.choice(n2, m, replace=False)]
            )
            for _ in range(num_subsets)
        ]
    )
    return float(mmds.mean()), float(mmds.std())


def inception_score(
    logits: np.ndarray, splits: int = 10, shuffle: bool = True, seed: int = 2020
) -> tuple[float, float]:
    """Inception Score (mean, std over `splits`) of [N, C] class logits, torch-fidelity's way.

    torch-fidelity shuffles before splitting (np.random.RandomState(seed).permutation), so its
    per-split scores do not depend on the order the samples were drawn in; split i takes rows
    i N // splits to (i + 1) N // splits. Float64 throughout, as theirs.
    """
    x = np.asarray(logits, np.float64)
    n = len(x)
    if x.ndim != 2 or n < splits:
        raise ValueError(f"inception_score: need [N >= splits={splits}, C] logits, got {x.shape}")
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    log_p = x - scipy.special.logsumexp(x, axis=1, keepdims=True)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        rows = slice(i * n // splits, (i + 1) * n // splits)
        log_q = np.log(p[rows].mean(axis=0, keepdims=True))  # the split's marginal p(y)
        kl = (p[rows] * (log_p[rows] - log_q)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------
# Statistics


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of [N, D] features in float64, covariance with ddof=1 like np.cov."""
    f = np.float64(features)
    return f.mean(axis=0), np.cov(f, rowvar=False)


class FeatureStats:
    """Streaming float64 mean/covariance plus a bounded uniform sample of features for KID.

    Keeps (count, sum, sum of outer products) of features minus a fixed shift (the first batch's
    mean): shifting is exact algebraically and avoids the cancellation in E[xx^T] - mu mu^T when
    features sit far from zero. Memory is O(D^2) however many features stream through. The KID
    sample is reservoir sampling (Algorithm R), so it is uniform over everything seen. With
    `keep_logits`, every row's class logits are kept too, in order (the Inception Score needs
    them all: 50k x 1008 float32 is 200 MB).
    """

    def __init__(self, dim: int = inception.FEATURE_DIM, max_kept: int = 0, seed: int = 0,
                 keep_logits: bool = False):
        self.dim = dim
        self._logits: list[np.ndarray] | None = [] if keep_logits else None
        self.max_kept = max_kept
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum = np.zeros(dim, np.float64)
        self._outer = np.zeros((dim, dim), np.float64)
        self._kept = np.zeros((max_kept, dim), np.float32)
        self._rng = np.random.default_rng(seed)

    def update(self, features: np.ndarray, logits: np.ndarray | None = None) -> None:
        """Add a [B, D] batch (and its [B, C] logits, kept if `keep_logits`)."""
        if self._logits is not None:
            if logits is None:
                raise ValueError("FeatureStats(keep_logits=True) needs logits with every batch")
            self._logits.append(np.asarray(logits, np.float32))
        f = np.asarray(features, np.float64).reshape(-1, self.dim)
        if self._shift is None and len(f):
            self._shift = f.mean(axis=0)
        if len(f):
            c = f - self._shift
            self._sum += c.sum(axis=0)
            self._outer += c.T @ c
            self._reservoir(np.asarray(features, np.float32).reshape(-1, self.dim))
            self.count += len(f)

    def _reservoir(self, f: np.ndarray) -> None:
        start, k = self.count, self.max_kept
        fill = max(0, min(k - start, len(f)))
        self._kept[start : start + fill] = f[:fill]
        # Row with global index i (>= k) replaces a random slot with probability k / (i + 1).
        idx = np.arange(start + fill, start + len(f))
        slots = self._rng.integers(0, idx + 1) if len(idx) else idx
        for row, slot in zip(idx - start, slots, strict=True):
            if slot < k:
                self._kept[slot] = f[row]

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) in float64; sigma uses ddof=1 like np.cov."""
        if self.count < 2:
            raise ValueError(f"need at least 2 features for a covariance, have {self.count}")
        mean_c = self._sum / self.count
        cov = (self._outer - self.count * np.outer(mean_c, mean_c)) / (self.count - 1)
        return mean_c + self._shift, (cov + cov.T) / 2.0

    def logits(self) -> np.ndarray:
        """[count, C] float32 logits of every row, in order (needs `keep_logits`)."""
        if self._logits is None:
            raise ValueError("these statistics were collected without keep_logits")
        return np.concatenate(self._logits) if self._logits else np.zeros((0, 0), np.float32)

    def kept_features(self) -> np.ndarray:
        """The uniform random sample of raw features (at most `max_kept` rows), float32."""
        return self._kept[: min(self.count, self.max_kept)].copy()


# ---------------------------------------------------------------------------------------------
# Feature extraction


def extract_features(
    params: inception.Variables,
    images_iter: Iterable[np.ndarray],
    apply_fn: Callable[[inception.Variables, Any], Any] | None = None,
    *,
    max_kept: int = KID_REFERENCE_FEATURES,
    seed: int = 0,
    mesh: Mesh | None = None,
    keep_logits: bool = False,
) -> FeatureStats:
    """Run the jitted Inception over batches of [B, H, W, 3] uint8 images into a FeatureStats.
    Greyscale batches [B, H, W, 1] go in as RGB with three equal channels (as pytorch-fid's
    `convert('RGB')` does). `apply_fn` returns features, or (features, logits) as
    FIDInceptionV3(with_logits=True) does; `keep_logits` keeps the logits (for the IS).

    Every batch is zero-padded to the size of the first one (rounded up to a multiple of the
    mesh size), so the network compiles once; padded rows are dropped. With `mesh`, batches are
    split over its first axis and `params` replicated.
    """
    apply_fn = inception.make_apply_fn() if apply_fn is None else apply_fn
    stats = FeatureStats(max_kept=max_kept, seed=seed, keep_logits=keep_logits)

    def add(outputs, n: int) -> None:
        features, logits = outputs if isinstance(outputs, tuple) else (outputs, None)
        logits = None if logits is None or not keep_logits else np.asarray(logits)[:n]
        stats.update(np.asarray(features)[:n], logits)
    batch_sharding = None
    if mesh is not None:
        batch_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
        params = jax.device_put(params, NamedSharding(mesh, P()))
    width, pending = None, None
    for images in images_iter:
        images = np.asarray(images)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        n = len(images)
        if width is None:
            shards = mesh.devices.size if mesh is not None else 1
            width = -(-n // shards) * shards
        if n > width:
            raise ValueError(f"batch of {n} is larger than the first batch ({width})")
        padded = np.concatenate([images, np.zeros((width - n, *images.shape[1:]), images.dtype)])
        batch = jax.device_put(padded, batch_sharding) if batch_sharding else padded
        features = apply_fn(params, batch)  # dispatched asynchronously
        # Fetch the previous batch (a host sync) only now, so the device keeps running while the
        # host accumulates float64 statistics.
        if pending is not None:
            add(*pending)
        pending = (features, n)
    if pending is not None:
        add(*pending)
    return stats


# ---------------------------------------------------------------------------------------------
# Weights


def default_cache_dir() -> str:
    """$DDPM_JAX_CACHE, else ~/.cache/ddpm_jax."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ddpm_jax")


def _unavailable(target: str, why: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"FID Inception weights not found at {target} ({why}): download {WEIGHTS_URL} "
        f"(sha256 {WEIGHTS_SHA256}) and run `python -m ddpm_jax.convert_inception "
        f"{WEIGHTS_PTH_NAME} {target}`, or set eval.inception_weights to the .npz/.pth path."
    )


def inception_weights_path(explicit_path: str = "") -> str:
    """Path of the converted .npz weights, downloading and converting them once if needed.

    Order: `explicit_path` (a .npz, or a .pth that is converted into the cache); then
    `<default_cache_dir()>/pt_inception-2015-12-05.npz`; then download WEIGHTS_URL (unless
    $DDPM_JAX_OFFLINE=1), check its SHA-256, convert and cache. Raises WeightsUnavailableError
    with a one-line how-to when none of this works.
    """
    target = os.path.join(default_cache_dir(), WEIGHTS_NPZ_NAME)
    if explicit_path:
        path = os.path.expanduser(explicit_path)
        if not os.path.isfile(path):
            raise _unavailable(path, "eval.inception_weights points at a missing file")
        if not path.endswith(".pth"):
            return path
        converted = os.path.join(default_cache_dir(), os.path.basename(path)[:-4] + ".npz")
        if not os.path.isfile(converted):
            if _sha256(path) != WEIGHTS_SHA256:
                warnings.warn(f"{path} is not the pytorch-fid release file", stacklevel=2)
            _convert(path, converted)
        return converted
    if os.path.isfile(target):
        return target
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise _unavailable(target, f"downloads disabled by {OFFLINE_ENV}")
    try:
        _download_and_convert(target)
    except (OSError, ValueError) as e:  # URLError is an OSError
        raise _unavailable(target, f"download failed: {type(e).__name__}: {e}") from e
    return target


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _convert(src: str, dst: str) -> None:
    from ddpm_jax import convert_inception  # the converter imports inception; keep import lazy

    convert_inception.convert(src, dst)


def _download_and_convert(target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        pth = os.path.join(tmp, WEIGHTS_PTH_NAME)
        with (
            urllib.request.urlopen(WEIGHTS_URL, timeout=DOWNLOAD_TIMEOUT_S) as r,
            open(pth, "wb") as f,
        ):
            while chunk := r.read(1 << 20):
                f.write(chunk)
        if (digest := _sha256(pth)) != WEIGHTS_SHA256:
            size = os.path.getsize(pth)
            raise ValueError(f"got {size} bytes with sha256 {digest}, expected {WEIGHTS_BYTES}")
        _convert(pth, target)


# ---------------------------------------------------------------------------------------------
# Reference statistics cache

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def stats_key(dataset_name: str, split: str, image_size: int | str, num_examples: int | None
              ) -> str:
    """A readable, filesystem-safe cache key, e.g. 'cifar10_train_32px_n50000_<features>-1a2b3c4d'.

    Unsafe characters collapse to '-', so a short hash of the exact inputs is appended to keep
    keys distinct (e.g. 'train[:50%]' vs 'train(50)').
    """
    n = f"n{num_examples}" if num_examples else "all"
    raw = f"{dataset_name}|{split}|{image_size}|{n}|{FEATURES_VERSION}"
    readable = "_".join(
        re.sub(r"[^A-Za-z0-9.]+", "-", part).strip("-.") or "x"
        for part in (dataset_name, split, f"{image_size}px", n, FEATURES_VERSION)
    )
    return f"{readable}-{hashlib.sha256(raw.encode()).hexdigest()[:8]}"


StatsTuple = tuple[np.ndarray, np.ndarray, np.ndarray]


def reference_stats(
    cache_dir: str, key: str, compute_fn: Callable[[], FeatureStats | StatsTuple]
) -> StatsTuple:
    """(mu, sigma, features_for_kid) for `key`, computed by `compute_fn` only on a cache miss.

    `compute_fn` returns a FeatureStats (its kept sample becomes the KID features) or a
    (mu, sigma, features) tuple; at most KID_REFERENCE_FEATURES features are stored. The cache
    file `<cache_dir>/fid_stats/<key>.npz` is written atomically, so concurrent writers and
    interrupted runs never leave a partial file.
    """
    if not _SAFE_KEY.match(key):
        raise ValueError(f"unsafe stats key {key!r}; build it with stats_key()")
    path = os.path.join(cache_dir, "fid_stats", f"{key}.npz")
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as f:
            return f["mu"], f["sigma"], f["features"]
    result = compute_fn()
    if isinstance(result, FeatureStats):
        mu, sigma = result.mean_cov()
        feats = result.kept_features()
    else:
        mu, sigma, feats = result
    mu, sigma = np.float64(mu), np.float64(sigma)
    feats = np.asarray(feats, np.float32)[:KID_REFERENCE_FEATURES]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, features=feats)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return mu, sigma, feats


def fid_kid(
    stats: FeatureStats,
    reference: StatsTuple,
    num_subsets: int = 100,
    subset_size: int = 1000,
) -> dict[str, float]:
    """{'fid', 'kid_mean', 'kid_std'} of generated-image stats against reference statistics."""
    mu, sigma = stats.mean_cov()
    ref_mu, ref_sigma, ref_feats = reference
    kid_mean, kid_std = kernel_inception_distance(
        stats.kept_features(), ref_feats, num_subsets, subset_size
    )
    return {
        "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
    }
