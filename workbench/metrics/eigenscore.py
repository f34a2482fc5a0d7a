"""EigenScore (INSIDE) exactly, and its eigendecomposition-free estimates: Chebyshev EES and Lanczos SLQ.

The math only: K sentence embeddings of one prompt's sampled generations in, one number out. Sampling the
generations and pooling the hidden states live with the caller. Spec: the project's SenD/EES spec, §2.2
(EigenScore), §2.3 (EES) and its Corrections, which win where they differ.
Notation: E ∈ R^{K×d} holds one embedding per row (K samples, d features), Z = Eᵀ ∈ R^{d×K} as in the paper,
J_d = I_d − (1/d)11ᵀ, α = 1e-3, and logs are natural.

    (1) covariance, K samples:  Σ = Zᵀ J_d Z / (d − 1) = A Aᵀ,  A = (E − row means of E) / √(d − 1)
                                                                        (§2.2 step 3; = torch.cov(E))
    (2) EigenScore:             ES = (1/K) Σ_{i=1}^{K} log(λ_i(Σ) + α) = (1/K) tr log(Σ + αI_K)  (§2.2 step 4)
    (3) smaller side:           det(αI_K + AAᵀ) = α^{K−d} det(αI_d + AᵀA) (Sylvester), so with B the smaller
                                of AAᵀ (K×K) and AᵀA (d×d), n = min(K, d):
                                K·ES = tr log(B + αI_n) + (K − n) log α
    (4) spectrum bound:         0 ≤ λ(B) ≤ U = (1 + margin)·λ̂_max,  λ̂_max by power iteration on B
    (5) map to [−1, 1]:         B̃ = (2/U) B − I_n,  f(t) = log(α + U(t + 1)/2),  so log(B + αI) = f(B̃)
    (6) interpolation:          f ≈ p_M = Σ''_{m=0}^{M} c_m T_m, equal to f at t_k = cos(πk/M), k = 0..M:
                                c_m = (2/M) Σ''_{k=0}^{M} f(t_k) cos(πmk/M), where Σ'' halves the first and
                                last terms (c_0 halved as in the spec, and c_M)              (Corrections)
    (7) Hutchinson moments:     μ_m = (1/N_z) Σ_j z_jᵀ T_m(B̃) z_j,  z_j Rademacher ∈ {±1}^n   (§2.3 step 3)
    (8) recurrence:             T_0 z = z,  T_1 z = B̃z,  T_{m+1} z = 2B̃ T_m z − T_{m−1} z, and from T_k z:
                                zᵀT_{2k}z = 2‖T_k z‖² − ‖z‖²,  zᵀT_{2k+1}z = 2(T_{k+1}z)ᵀ(T_k z) − zᵀT_1 z
    (9) EES:                    EES = (Σ_{m=0}^{M} c_m μ_m + (K − n) log α) / K     (§2.3 step 4, Corrections)

`eigenscore` is (2) from `torch.linalg.eigvalsh` of (1) in float64: INSIDE's `getEigenIndicator_v0` up to its
base-10 logs (it takes `log10` of the singular values of Σ + αI; here natural logs, as the spec's formula).
Eigenvalues of Σ below 0 are rounding (Σ is positive semi-definite) and are clamped to 0 first.

`efficient_eigenscore` is (3)-(9): only products of B with blocks of vectors, taken through the centred
embeddings as (VA)Aᵀ or (VAᵀ)A for a block V of row vectors, or through B formed once when that takes fewer
flops (VB costs 2n²N_z against 4nmN_z through A, m = max(K, d), and forming B costs 2n²m). No
eigendecomposition, SVD, Cholesky or determinant is taken anywhere. Choices made here, beyond the spec:
- (3) works in the smaller dimension. When K ≥ d, Σ has K − d + 1 eigenvalues that are exactly 0 (each row
  of A sums to 0): K − d of them are counted exactly as log α, without any probe or product.
- (8) doubles the moments: M moments cost ⌈M/2⌉ products with B (Weiße et al., Rev. Mod. Phys. 78, 2006).
- When N_z ≥ n the n unit vectors replace the Rademacher probes: the trace in (7) is then exact (cheaper
  too, and the seed no longer matters); only the Chebyshev error is left. This is the case at INSIDE's K = 10.
- (6) uses the Chebyshev points of the second kind (they include t = ±1) rather than the first kind: an
  eigenvalue 0 of B (x = 0, e.g. from repeated samples) is then interpolated exactly, and the worst error of
  log is half that of the first kind at the same M (0.0075 against 0.015 nats at M = 2√κ).
- Degree: the error of (6) shrinks like ρ^{−M}, ρ = (√κ + 1)/(√κ − 1) ≈ 1 + 2/√κ, κ = (U + α)/α, and is
  largest just above x = 0. `moments=None` takes M = ⌈2√κ⌉ clamped to [16, 2048]: a worst pointwise error
  of log of 0.0075 nats for any κ up to 10⁶ (measured for κ = 10²..10⁶), so the Chebyshev part of EES is off
  by at most that, typically by < 1e-3. κ above about 10⁶ (λ_max above about 1000 at α = 1e-3) hits the cap
  and the error at eigenvalues near α grows (worst 0.08 nats at κ = 4·10⁶, 0.27 at 10⁷). `moments` fixes M.
- (4): power iteration (20 products with a block of 4 vectors) underestimates λ_max by up to 3% on
  Marchenko-Pastur-like spectra, hence the 5% margin. If an eigenvalue of B still lies above U, T_m(B̃)
  grows without bound there: any |z_jᵀT_m z_j| > ‖z_j‖² (impossible with the spectrum inside [−1, 1])
  triggers a rerun with a wider U, up to the guaranteed λ_max ≤ tr B = ‖A‖²_F.
- Batched input (..., K, d) shares the probes across the batch and pads each element's coefficients with zeros
  up to the batch's largest degree, so each element gets what it would get alone.
The official code's per-feature standardisation does not estimate EigenScore (r ≈ −0.04 with the exact value
over 200 random embedding sets, Corrections) and is not reproduced. No range is asserted for either number:
log-eigenvalues below 1 are negative, so neither EigenScore ∈ [0, ∞) nor EES ∈ [−1, 1] holds (Corrections).

Error of EES at the defaults against `eigenscore` (absolute, in nats; 4 spectra — isotropic Gaussian, singular
values falling 1000× exponentially, rank n/8, one direction shared by all samples — × 5 draws each; asserted
in tests/metrics/test_eigenscore.py):
- n = min(K, d) ≤ N_z = 64, the exact trace: the Chebyshev error alone, ≤ 0.0075 nats for κ ≤ 10⁶ by the
  degree rule; measured ≤ 0.001 nats (K = 10, d = 128 and K = 64, d = 512).
- n > 64: Hutchinson's error on top, standard deviation sqrt(2/N_z)·‖offdiag log(B + αI)‖_F / K. Measured at
  K × d = 128×512, 256×512, 512×128, 512×1024: RMS 0.004-0.08 nats, worst of the 20 draws per size 0.15 nats
  (decaying spectrum, K = 128), i.e. ≤ 6% of |EigenScore| except where it is near 0 (isotropic, K ≤ d/2).
  More probes cut it as 1/√N_z (the Corrections' check: M = 60, N_z = 200 within 0.03-0.06 nats).

Speed (bench/eigenscore.py; float64, one thread of a 2-core CPU shared with other jobs). Exact is faster at
INSIDE's K = 10: about 60 µs against 1-3 ms for EES. At larger K the exact cost is the Gram matrix (2K²d flops
or 2Kd² on the smaller side) plus eigvalsh (K³); EES needs the same Gram matrix, or ⌈M/2⌉ + 20 passes over A,
and M = ⌈2√κ⌉ is in the hundreds to thousands for skewed spectra at α = 1e-3. So on CPU EES did not beat the
best exact route (eigvalsh, slogdet, or eigvalsh of the smaller side) at any K ≤ 1024, d ≤ 4096. It beat the
K×K eigvalsh only at K = 1024 with d = 64 (and d = 512 on isotropic embeddings), through (3), which an exact
eigvalsh of the d×d side shares. At K = 1024, d = 4096 the Gram matrix alone is most of the exact time, so
no (M, N_z) came near 5× (at best 1.1-1.2×, at 4-270% error). EES can pay where eigvalsh is slow
relative to matrix products (GPUs), or for n in the thousands.

`slq_logdet_mean` is the off-the-shelf comparison estimator of the same (2): stochastic Lanczos quadrature
(Ubaru, Chen & Saad, SIAM J. Matrix Anal. Appl. 38, 2017; as in GPyTorch and TensorFlow Probability), run on
the same B and probes: m Lanczos steps from each probe z_j/‖z_j‖ build a tridiagonal T_j, and
    (10) tr log(B + αI) ≈ (1/N_z) Σ_j ‖z_j‖² Σ_{i=1}^{m} (e_1ᵀ y_i)² log(θ_i + α),   T_j = Σ_i θ_i y_i y_iᵀ,
the Gauss quadrature of the spectral measure of z_j; the small m×m eigendecomposition is the method's own.
At its default m = 40 it matched EES on benign spectra but was off by 0.5-1 nats on the skewed ones at
n ≥ 256 (κ ~ 10⁶ needs m ~ √κ steps, as EES needs M ~ 2√κ).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ALPHA = 1e-3  # INSIDE's regulariser of Σ
PROBES = 64  # N_z: Rademacher probe vectors (the n unit vectors, exact, when n <= N_z)
POWER_ITERATIONS = 20  # products with B on a block of POWER_BLOCK vectors, for λ_max
POWER_BLOCK = 4
POWER_START_SEED = 0  # the power-iteration start is fixed: the seed moves only the probes
MARGIN = 0.05  # U = (1 + MARGIN) * power-iteration estimate of λ_max (20 iterations: up to 3% under)
WIDENING = (1.1, 2.0, 10.0, math.inf)  # factors on U after an escape, then U = tr B (inf: capped there)
MIN_MOMENTS, MAX_MOMENTS = 16, 2048  # clamp of the adaptive degree M = ceil(2 sqrt(kappa))
LANCZOS_STEPS = 40  # m, SLQ
_ESCAPE_TOLERANCE = 1e-8  # relative slack on |z^T T_m z| <= ||z||^2 before B counts as outside [-1, 1]


# --- input and the covariance --------------------------------------------------------------------------


def _checked(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """The embeddings as float64, once shape (..., K, d) with K, d >= 2, finiteness and alpha check out."""
    if not isinstance(embeddings, torch.Tensor):
        kind = type(embeddings).__name__
        raise ValueError(f"embeddings must be a torch.Tensor of shape (..., K, d), got {kind}")
    if embeddings.ndim < 2:
        raise ValueError(f"embeddings must have shape (..., K, d) (K samples x d features), got a "
                         f"{embeddings.ndim}-D tensor of shape {tuple(embeddings.shape)}")
    samples, features = embeddings.shape[-2:]
    if samples < 2:
        raise ValueError(f"EigenScore needs at least K = 2 samples (rows), got K = {samples}")
    if features < 2:
        raise ValueError(f"EigenScore needs at least d = 2 features (columns) to centre, got d = {features}")
    if embeddings.numel() == 0:
        raise ValueError(f"embeddings are empty: shape {tuple(embeddings.shape)}")
    if embeddings.is_complex():
        raise ValueError("embeddings must be real")
    values = embeddings.detach().to(torch.float64)
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"embeddings contain {bad} NaN or infinite value(s)")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0 (it is added to zero eigenvalues), got {alpha}")
    return values


def centred_factor(embeddings: torch.Tensor) -> torch.Tensor:
    """Eq. (1): A = (E − row means) / √(d − 1) in float64, so that Σ = A Aᵀ; shape (..., K, d)."""
    values = embeddings.to(torch.float64)
    return (values - values.mean(dim=-1, keepdim=True)) / math.sqrt(values.shape[-1] - 1)


def sample_covariance(embeddings: torch.Tensor) -> torch.Tensor:
    """Eq. (1): the K×K covariance Σ over the K samples, float64; `torch.cov(E)` for each (K, d) E."""
    factor = centred_factor(embeddings)
    return factor @ factor.mT


def eigenscore(embeddings: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """Eq. (2), exactly: (1/K) Σ_i log(λ_i(Σ) + α) with Σ the K×K covariance (1) and natural logs.

    `embeddings` (..., K, d): K sample embeddings (rows) of d features; the result has shape (...), float64,
    on the embeddings' device. No range is asserted: it is negative whenever most λ_i + α < 1.
    """
    values = _checked(embeddings, alpha)
    eigenvalues = torch.linalg.eigvalsh(sample_covariance(values)).clamp(min=0.0)
    return torch.log(eigenvalues + alpha).mean(dim=-1)


# --- the operator B of eq. (3) --------------------------------------------------------------------------


class _SmallerGram:
    """B of eq. (3), the smaller of AAᵀ (K×K) and AᵀA (d×d). Blocks of vectors are rows, shape (..., N, n),
    and products are taken as VB (= (BV)ᵀ, B symmetric): contiguous row blocks times A ran 2-8 times faster
    than Aᵀ times column blocks (K = 1024, d = 4096, one CPU thread)."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        self.factor = centred_factor(embeddings)
        samples, features = self.factor.shape[-2:]
        self.samples_side = samples <= features
        self.n, self.other = min(samples, features), max(samples, features)
        self.zero_count = samples - self.n  # eigenvalues of Σ known to be exactly 0: K − n log α terms
        self.matrix: torch.Tensor | None = None

    def form_if_cheaper(self, products: int, block: int) -> None:
        """Form B once when `products` products with (`block`, n) blocks cost more flops through A."""
        form_flops = 2 * self.n**2 * self.other + products * 2 * self.n**2 * block
        factored_flops = products * 4 * self.n * self.other * block
        if self.matrix is None and form_flops < factored_flops:
            self.matrix = self.factor @ self.factor.mT if self.samples_side else self.factor.mT @ self.factor

    def times(self, rows: torch.Tensor) -> torch.Tensor:
        """V B for a row block V (..., N, n): (VA)Aᵀ or (VAᵀ)A, or V B when B is formed."""
        if self.matrix is not None:
            return rows @ self.matrix
        if self.samples_side:
            return (rows @ self.factor) @ self.factor.mT
        return (rows @ self.factor.mT) @ self.factor

    def shifted(self, upper: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Eq. (5): V ↦ VB̃ = (2/U) VB − V, a fresh tensor, with B̃ formed once when B is."""
        scale = (2.0 / upper)[..., None, None]
        if self.matrix is not None:
            identity = torch.eye(self.n, dtype=self.matrix.dtype, device=self.matrix.device)
            matrix = scale * self.matrix - identity
            return lambda rows: rows @ matrix
        return lambda rows: scale * self.times(rows) - rows

    def trace(self) -> torch.Tensor:
        """tr B = ‖A‖²_F ≥ λ_max(B), shape (...)."""
        return self.factor.square().sum(dim=(-2, -1))


def _largest_eigenvalue(gram: _SmallerGram, iterations: int) -> torch.Tensor:
    """Power iteration on a fixed block of Gaussian vectors (the same for every seed): max over the block of
    ‖Bv‖/‖v‖ ≤ λ_max(B) after the last product, shape (...)."""
    generator = torch.Generator().manual_seed(POWER_START_SEED)
    shape = (min(POWER_BLOCK, gram.n), gram.n)
    vectors = torch.randn(shape, generator=generator, dtype=torch.float64).to(gram.factor.device)
    estimate = torch.zeros(gram.factor.shape[:-2], dtype=torch.float64, device=gram.factor.device)
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(max(iterations, 1)):
        images = gram.times(vectors)
        norms = images.norm(dim=-1)
        estimate = (norms / vectors.norm(dim=-1).clamp(min=tiny)).amax(dim=-1)
        vectors = images / norms.clamp(min=tiny).unsqueeze(-1)
    return estimate


def _probes(n: int, probes: int, generator: torch.Generator,
            device: torch.device) -> tuple[torch.Tensor, float]:
    """The probe rows Z (N, n) and the factor turning Σ_j z_jᵀ X z_j into the estimate of tr X: N_z Rademacher
    vectors and 1/N_z, or the n unit vectors and 1 (the exact trace) when N_z >= n."""
    if probes >= n:
        return torch.eye(n, dtype=torch.float64, device=device), 1.0
    signs = torch.randint(0, 2, (probes, n), generator=generator, dtype=torch.int8)
    return (2.0 * signs.to(torch.float64) - 1.0).to(device), 1.0 / probes


# --- EES: Chebyshev interpolation and moments ------------------------------------------------------------


def chebyshev_log_coefficients(upper: torch.Tensor, alpha: float, degree: int) -> torch.Tensor:
    """Eq. (6): c_0..c_M interpolating f(t) = log(α + U(t + 1)/2) at the M + 1 Chebyshev points cos(πk/M), one
    row per element of `upper` (U, shape (...)): shape (..., M + 1), c_0 and c_M halved."""
    order = torch.arange(degree + 1, dtype=torch.float64, device=upper.device)
    angles = math.pi * order / degree
    values = torch.log(alpha + upper.unsqueeze(-1) * (torch.cos(angles) + 1.0) / 2.0)
    values[..., 0] /= 2.0
    values[..., -1] /= 2.0
    coefficients = (2.0 / degree) * values @ torch.cos(torch.outer(angles, order))
    coefficients[..., 0] /= 2.0
    coefficients[..., -1] /= 2.0
    return coefficients


def chebyshev_moments(gram: _SmallerGram, upper: torch.Tensor, probes: torch.Tensor,
                      degree: int) -> torch.Tensor:
    """Eq. (8): z_jᵀ T_m(B̃) z_j for every probe row j and m = 0..M, with B̃ = (2/U)B − I, from ⌈M/2⌉ products
    with B; shape (..., N, M + 1)."""
    shifted = gram.shifted(upper)
    previous = probes.expand(*upper.shape, *probes.shape)  # T_{k-1} z, starting at k = 1
    current = shifted(previous)  # T_k z
    first = torch.linalg.vecdot(previous, previous)  # zᵀz
    second = torch.linalg.vecdot(previous, current)  # zᵀT_1 z
    moments = [first, second]
    while len(moments) < degree + 1:
        moments.append(2.0 * torch.linalg.vecdot(current, current) - first)  # zᵀT_2k z
        if len(moments) == degree + 1:
            break
        previous, current = current, shifted(current).mul_(2.0).sub_(previous)
        moments.append(2.0 * torch.linalg.vecdot(current, previous) - second)  # zᵀT_{2k+1} z
    return torch.stack(moments[: degree + 1], dim=-1)


def _escaped(moments: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """True per element where some |z_jᵀT_m z_j| > ‖z_j‖² among the degrees it uses: an eigenvalue of B is
    above U."""
    used = (coefficients != 0).unsqueeze(-2)
    bound = moments[..., :1] * (1.0 + _ESCAPE_TOLERANCE)
    return ((moments.abs() > bound) & used).flatten(-2).any(dim=-1)


def efficient_eigenscore(embeddings: torch.Tensor, alpha: float = ALPHA, moments: int | None = None,
                         probes: int = PROBES, seed: int = 0,
                         power_iterations: int = POWER_ITERATIONS) -> torch.Tensor:
    """EES, eqs. (3)-(9): the EigenScore (2) from products with the centred embeddings, no eigendecomposition.

    `moments`: the Chebyshev degree M; None picks ⌈2√κ⌉ ∈ [16, 2048] per element (module docstring).
    `probes`: N_z Rademacher probes, or the exact trace when N_z >= min(K, d). `seed` seeds the
    torch.Generator that draws the probes: same seed, same result (with the exact trace, the same result for
    every seed). `power_iterations`: products with B spent on λ_max. Returns shape (...), float64, on the
    embeddings' device.
    """
    values = _checked(embeddings, alpha)
    if moments is not None and moments < 1:
        raise ValueError(f"moments must be >= 1 (or None for the adaptive degree), got {moments}")
    if probes < 1 or power_iterations < 1:
        raise ValueError(f"probes and power_iterations must be >= 1, got {probes} and {power_iterations}")
    generator = torch.Generator().manual_seed(seed)
    gram = _SmallerGram(values)
    estimate = _largest_eigenvalue(gram, power_iterations)
    probe_block, weight = _probes(gram.n, probes, generator, values.device)
    tiny = torch.full_like(estimate, alpha * 1e-9)  # Σ = 0 (each embedding constant): f is log α throughout
    ceiling = torch.maximum(gram.trace(), tiny)  # tr B >= λ_max(B): the spectrum is inside for sure
    upper = torch.minimum(torch.maximum((1.0 + MARGIN) * estimate, tiny), ceiling)
    for attempt in range(len(WIDENING) + 1):
        degrees = _degrees(upper, alpha, moments)
        coefficients = _padded_coefficients(upper, alpha, degrees)
        gram.form_if_cheaper(products=(int(degrees.max()) + 1) // 2, block=probe_block.shape[0])
        per_probe = chebyshev_moments(gram, upper, probe_block, coefficients.shape[-1] - 1)
        escaped = _escaped(per_probe, coefficients)
        if not bool(escaped.any()):
            break
        if attempt == len(WIDENING):
            raise RuntimeError("EES: the spectrum escaped [0, tr B], which cannot happen; please report it")
        upper = torch.where(escaped, torch.minimum(WIDENING[attempt] * upper, ceiling), upper)
    trace = weight * (per_probe.sum(dim=-2) * coefficients).sum(dim=-1)
    return (trace + gram.zero_count * math.log(alpha)) / values.shape[-2]


def _degrees(upper: torch.Tensor, alpha: float, moments: int | None) -> torch.Tensor:
    """M per element: `moments`, or ⌈2√κ⌉ clamped, κ = (U + α)/α."""
    if moments is not None:
        return torch.full_like(upper, moments, dtype=torch.int64)
    kappa = (upper + alpha) / alpha
    return torch.ceil(2.0 * kappa.sqrt()).clamp(MIN_MOMENTS, MAX_MOMENTS).to(torch.int64)


def _padded_coefficients(upper: torch.Tensor, alpha: float, degrees: torch.Tensor) -> torch.Tensor:
    """Eq. (6) per element at its own degree, zero-padded to the largest: shape (..., max M + 1)."""
    largest = int(degrees.max())
    padded = torch.zeros(*upper.shape, largest + 1, dtype=torch.float64, device=upper.device)
    for degree in degrees.unique().tolist():
        chosen = degrees == degree
        padded[chosen, : degree + 1] = chebyshev_log_coefficients(upper[chosen], alpha, degree)
    return padded


# --- SLQ: the comparison estimator ----------------------------------------------------------------------


def lanczos_tridiagonal(gram: _SmallerGram, start: torch.Tensor,
                        steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """m steps of Lanczos (no reorthogonalisation) from each unit row of `start` (..., N, n) at once: the
    diagonals (..., N, m) and off-diagonals (..., N, m − 1) of the tridiagonal matrices. After a breakdown
    (an invariant subspace, at the latest after n steps) the rest of that row's matrix is zero."""
    current = start.expand(*gram.factor.shape[:-2], *start.shape)
    previous = torch.zeros_like(current)
    beta = torch.zeros(current.shape[:-1], dtype=torch.float64, device=current.device)
    scale = torch.zeros_like(beta)
    diagonals, off_diagonals = [], []
    for step in range(steps):
        image = gram.times(current) - beta.unsqueeze(-1) * previous
        alpha = torch.linalg.vecdot(current, image)
        image = image - alpha.unsqueeze(-1) * current
        diagonals.append(alpha)
        if step == steps - 1:
            break
        beta = image.norm(dim=-1)
        scale = torch.maximum(scale, alpha.abs() + beta)
        alive = beta > 1e-10 * scale
        beta = torch.where(alive, beta, torch.zeros_like(beta))
        following = torch.where(alive.unsqueeze(-1), image / beta.clamp(min=1e-300).unsqueeze(-1), 0.0)
        previous, current = current, following
        off_diagonals.append(beta)
    empty = diagonals[0][..., :0]
    return torch.stack(diagonals, dim=-1), torch.stack(off_diagonals, dim=-1) if off_diagonals else empty


def slq_logdet_mean(embeddings: torch.Tensor, alpha: float = ALPHA, steps: int = LANCZOS_STEPS,
                    probes: int = PROBES, seed: int = 0) -> torch.Tensor:
    """Eq. (10): the EigenScore (2) by stochastic Lanczos quadrature, on the same B (3) and probes as EES.

    `steps`: Lanczos steps m (at most n); `probes` and `seed` as in `efficient_eigenscore`. Shape (...),
    float64.
    """
    values = _checked(embeddings, alpha)
    if steps < 1 or probes < 1:
        raise ValueError(f"steps and probes must be >= 1, got {steps} and {probes}")
    generator = torch.Generator().manual_seed(seed)
    gram = _SmallerGram(values)
    steps = min(steps, gram.n)
    probe_block, weight = _probes(gram.n, probes, generator, values.device)
    gram.form_if_cheaper(products=steps, block=probe_block.shape[0])
    squared_norms = torch.linalg.vecdot(probe_block, probe_block)
    starts = probe_block / squared_norms.sqrt().unsqueeze(-1)
    diagonal, off_diagonal = lanczos_tridiagonal(gram, starts, steps)
    tridiagonal = (torch.diag_embed(diagonal) + torch.diag_embed(off_diagonal, 1)
                   + torch.diag_embed(off_diagonal, -1))
    nodes, vectors = torch.linalg.eigh(tridiagonal)
    quadrature = (vectors[..., 0, :].square() * torch.log(nodes.clamp(min=0.0) + alpha)).sum(dim=-1)
    trace = weight * (squared_norms * quadrature).sum(dim=-1)
    return (trace + gram.zero_count * math.log(alpha)) / values.shape[-2]
