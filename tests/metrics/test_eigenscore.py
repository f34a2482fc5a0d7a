"""EigenScore and its estimators (workbench/metrics/eigenscore.py): the exact score against float64 numpy,
EES and SLQ against the exact score on skewed and low-rank spectra, the error falling with the degree and the
probe count, determinism in the seed, no eigendecomposition inside EES, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench.metrics import eigenscore as module
from workbench.metrics.eigenscore import (
    centred_factor,
    chebyshev_log_coefficients,
    efficient_eigenscore,
    eigenscore,
    sample_covariance,
    slq_logdet_mean,
)

ALPHA = 1e-3
CHEBYSHEV_BOUND = 0.008  # the adaptive degree's worst pointwise error of log, 0.0075 nats (module docstring)


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrices: one thread is faster, and much faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def embeddings(samples: int, features: int, spectrum: str, seed: int = 0) -> torch.Tensor:
    """(K, d) float32 embeddings: `isotropic` Gaussian, `decaying` (singular values falling 1000x
    exponentially), `lowrank` (rank min(K, d)/8) or `shared` (one direction common to all samples + noise)."""
    g = torch.Generator().manual_seed(seed)
    rank = min(samples, features)
    if spectrum == "isotropic":
        values = torch.randn(samples, features, generator=g, dtype=torch.float64)
    elif spectrum == "decaying":
        singular = math.sqrt(features) * torch.logspace(0, -3, rank, dtype=torch.float64)
        left = torch.randn(samples, rank, generator=g, dtype=torch.float64)
        right = torch.randn(rank, features, generator=g, dtype=torch.float64) / math.sqrt(features)
        values = (left * singular) @ right
    elif spectrum == "lowrank":
        rank = max(1, rank // 8)
        left = torch.randn(samples, rank, generator=g, dtype=torch.float64)
        values = left @ torch.randn(rank, features, generator=g, dtype=torch.float64) / math.sqrt(rank)
    elif spectrum == "shared":
        common = 3.0 * torch.randn(1, features, generator=g, dtype=torch.float64)
        values = common + 0.1 * torch.randn(samples, features, generator=g, dtype=torch.float64)
    else:
        raise ValueError(spectrum)
    return values.float()


def numpy_eigenscore(values: torch.Tensor, alpha: float = ALPHA) -> float:
    """Eq. (2) independently: numpy's covariance over the samples (rows are variables), eigvalsh, float64."""
    covariance = np.cov(values.double().numpy())
    return float(np.mean(np.log(np.clip(np.linalg.eigvalsh(covariance), 0.0, None) + alpha)))


def exact(values: torch.Tensor) -> float:
    """The reference for the estimators: `eigenscore`, checked against numpy above (numpy's own threads would
    fight other processes for the cores at K = 512)."""
    return float(eigenscore(values))


def hutchinson_sd(values: torch.Tensor, probes: int, alpha: float = ALPHA) -> float:
    """The standard deviation of EES's Hutchinson part, sqrt(2/N_z)·‖offdiag log(B + αI)‖_F / K, by eigh."""
    factor = centred_factor(values)
    gram = factor @ factor.mT if factor.shape[0] <= factor.shape[1] else factor.mT @ factor
    eigenvalues, vectors = torch.linalg.eigh(gram)
    log_gram = (vectors * torch.log(eigenvalues.clamp(min=0) + alpha)) @ vectors.mT
    off_diagonal = log_gram.square().sum() - log_gram.diagonal().square().sum()
    return math.sqrt(2.0 / probes * float(off_diagonal)) / values.shape[0]


# --- exact EigenScore ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("samples", "features"), [(10, 64), (10, 5), (2, 2), (64, 16), (33, 300)])
@pytest.mark.parametrize("spectrum", ["isotropic", "decaying", "lowrank", "shared"])
def test_eigenscore_matches_numpy(samples, features, spectrum):
    values = embeddings(samples, features, spectrum, seed=samples + features)
    score = eigenscore(values)
    assert score.dtype == torch.float64 and score.shape == ()
    assert float(score) == pytest.approx(numpy_eigenscore(values), abs=1e-9)


def test_covariance_is_torch_cov_and_scores_batch():
    values = torch.randn(2, 3, 10, 40, dtype=torch.float64)
    covariance = sample_covariance(values)
    assert torch.allclose(covariance[1, 2], torch.cov(values[1, 2]), atol=1e-12)
    batched = eigenscore(values)
    assert batched.shape == (2, 3)
    assert float(batched[1, 2]) == pytest.approx(numpy_eigenscore(values[1, 2]), abs=1e-10)
    assert eigenscore(values, alpha=0.5)[0, 0] > batched[0, 0]


def test_no_range_is_imposed():
    """Corrections: neither [0, inf) nor [-1, 1]: small embeddings give about log(alpha), large ones > 0."""
    assert float(eigenscore(1e-4 * torch.randn(10, 64))) < -6.0
    assert float(eigenscore(10.0 * torch.randn(10, 64))) > 4.0
    constant = torch.ones(10, 8) * torch.arange(10.0).unsqueeze(-1)  # each embedding constant: Sigma = 0
    assert float(eigenscore(constant)) == pytest.approx(math.log(ALPHA), abs=1e-12)
    assert float(efficient_eigenscore(constant)) == pytest.approx(math.log(ALPHA), abs=1e-9)


# --- EES against the exact score ----------------------------------------------------------------------------


def test_interpolation_is_exact_at_the_nodes_and_at_zero():
    upper = torch.tensor([7.0, 0.3], dtype=torch.float64)
    coefficients = chebyshev_log_coefficients(upper, ALPHA, 12)
    nodes = np.cos(np.pi * np.arange(13) / 12)
    for row, bound in zip(coefficients.numpy(), upper.tolist(), strict=True):
        fitted = np.polynomial.chebyshev.chebval(nodes, row)
        assert np.allclose(fitted, np.log(ALPHA + bound * (nodes + 1) / 2), atol=1e-12)


@pytest.mark.parametrize(("samples", "features"), [(10, 16), (10, 512), (64, 16), (64, 64), (256, 48)])
@pytest.mark.parametrize("spectrum", ["isotropic", "decaying", "lowrank", "shared"])
def test_ees_at_defaults_exact_trace(samples, features, spectrum):
    """n = min(K, d) <= N_z = 64: the trace is exact and only the Chebyshev error is left, <= 0.0075 nats for
    kappa <= 1e6 (shared-256 goes above and is capped at M = 2048, but has no eigenvalue near alpha)."""
    values = embeddings(samples, features, spectrum, seed=3)
    error = float(efficient_eigenscore(values)) - exact(values)
    assert abs(error) <= CHEBYSHEV_BOUND


@pytest.mark.parametrize(("samples", "features"), [(256, 512), (512, 128)])
@pytest.mark.parametrize("spectrum", ["isotropic", "decaying", "lowrank", "shared"])
def test_ees_at_defaults_with_probes(samples, features, spectrum):
    """n > N_z: Chebyshev error plus Hutchinson's, within 4 of its standard deviations (module docstring)."""
    values = embeddings(samples, features, spectrum, seed=5)
    error = float(efficient_eigenscore(values)) - exact(values)
    assert abs(error) <= CHEBYSHEV_BOUND + 4.0 * hutchinson_sd(values, module.PROBES)
    assert abs(error) <= 0.15


def test_error_falls_with_the_degree():
    values = embeddings(40, 200, "decaying", seed=1)  # exact trace (n = 40): the Chebyshev error alone
    reference = exact(values)
    errors = [abs(float(efficient_eigenscore(values, moments=m)) - reference) for m in (16, 64, 256, 1024)]
    assert all(later < earlier / 3 for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-6


def test_error_falls_with_the_probe_count():
    values = embeddings(200, 400, "isotropic", seed=2)
    reference = exact(values)

    def rms(probes: int) -> float:
        estimates = [float(efficient_eigenscore(values, moments=128, probes=probes, seed=seed))
                     for seed in range(8)]
        errors = [estimate - reference for estimate in estimates]
        return math.sqrt(sum(e * e for e in errors) / len(errors))

    few, some, many = rms(4), rms(16), rms(64)
    assert many < some < few
    assert many < few / 2.5  # ~ 1/sqrt(N_z): the ratio 4 expected
    assert few == pytest.approx(hutchinson_sd(values, 4), rel=0.6)


def test_deterministic_in_the_seed():
    values = embeddings(128, 96, "decaying", seed=4)  # n = 96 > 32 probes: Rademacher probes
    first = efficient_eigenscore(values, probes=32, seed=11)
    assert torch.equal(first, efficient_eigenscore(values, probes=32, seed=11))
    assert not torch.equal(first, efficient_eigenscore(values, probes=32, seed=12))
    small = embeddings(10, 64, "isotropic")  # n = 10 <= 64: the exact trace, the seed plays no part
    assert torch.equal(efficient_eigenscore(small, seed=0), efficient_eigenscore(small, seed=1))
    lanczos = slq_logdet_mean(values, probes=32, seed=11)
    assert torch.equal(lanczos, slq_logdet_mean(values, probes=32, seed=11))
    assert not torch.equal(lanczos, slq_logdet_mean(values, probes=32, seed=3))


def test_batched_matches_one_at_a_time():
    values = torch.stack([embeddings(80, 120, kind, seed=6) for kind in ("isotropic", "shared", "lowrank")])
    batched = efficient_eigenscore(values.view(3, 1, 80, 120), probes=16)
    assert batched.shape == (3, 1)
    for row, single in zip(batched[:, 0], values, strict=True):
        assert float(row) == pytest.approx(float(efficient_eigenscore(single, probes=16)), abs=1e-9)
    assert torch.allclose(eigenscore(values), torch.stack([eigenscore(v) for v in values]), atol=1e-12)


def test_an_underestimated_spectrum_is_widened(monkeypatch):
    """One power iteration and no margin put lambda_max above U; the moment check reruns with a wider U."""
    monkeypatch.setattr(module, "MARGIN", 0.0)
    escapes = []
    original = module._escaped

    def spy(*args):
        escaped = original(*args)
        escapes.append(bool(escaped.any()))
        return escaped

    monkeypatch.setattr(module, "_escaped", spy)
    values = embeddings(60, 300, "isotropic", seed=8)
    error = float(efficient_eigenscore(values, power_iterations=1)) - exact(values)
    assert escapes[0] and not escapes[-1]
    assert abs(error) <= CHEBYSHEV_BOUND


def test_ees_takes_no_decomposition(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("EES called a decomposition")

    for name in ("eigh", "eigvalsh", "eig", "eigvals", "svd", "svdvals", "slogdet", "det", "cholesky",
                 "cholesky_ex", "qr", "lu", "lu_factor", "inv", "solve", "lstsq", "matrix_rank", "pinv",
                 "matrix_norm"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    for name in ("svd", "det", "logdet", "slogdet", "cholesky", "qr", "lu", "inverse", "pinverse"):
        monkeypatch.setattr(torch, name, forbidden)
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for samples, features in ((10, 64), (120, 40), (200, 300)):
        assert torch.isfinite(efficient_eigenscore(embeddings(samples, features, "decaying")))
    with pytest.raises(AssertionError, match="decomposition"):
        eigenscore(embeddings(10, 64, "isotropic"))  # the patch does bite


# --- SLQ ----------------------------------------------------------------------------------------------------


def test_slq_is_exact_with_a_full_basis_and_close_at_defaults():
    small = embeddings(10, 64, "decaying")
    assert float(slq_logdet_mean(small, steps=10)) == pytest.approx(exact(small), abs=1e-6)
    values = embeddings(256, 512, "isotropic", seed=9)
    error = float(slq_logdet_mean(values)) - exact(values)
    assert abs(error) <= 0.01 + 4.0 * hutchinson_sd(values, module.PROBES)


# --- bad input ----------------------------------------------------------------------------------------------

BAD = [
    (torch.randn(16), "1-D"),
    (torch.randn(1, 16), "at least K = 2 samples"),
    (torch.randn(10, 1), "at least d = 2 features"),
    (torch.randn(0, 10, 16), "empty"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN"),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "infinite"),
    ([[1.0, 2.0], [3.0, 4.0]], "torch.Tensor"),
]


@pytest.mark.parametrize("function", [eigenscore, efficient_eigenscore, slq_logdet_mean])
@pytest.mark.parametrize(("values", "message"), BAD)
def test_bad_input_is_named(function, values, message):
    with pytest.raises(ValueError, match=message):
        function(values)


BAD_OPTIONS = [({"alpha": 0.0}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"moments": 0}, "moments"),
               ({"probes": 0}, "probes"), ({"power_iterations": 0}, "power_iterations")]


@pytest.mark.parametrize(("kwargs", "message"), BAD_OPTIONS)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        efficient_eigenscore(torch.randn(10, 16), **kwargs)
