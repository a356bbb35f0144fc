"""FID and KID on feature matrices (float64 statistics), the PSD matrix square root FID needs, and the Inception
Score on class probabilities."""

from __future__ import annotations

import torch


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigendecomposition; tiny negative eigenvalues
    from rounding are clipped to 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """|mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½), with tr((S1 S2)^½) = tr((S1^½ S2 S1^½)^½), a symmetric PSD
    root (no complex parts to discard, unlike scipy's general sqrtm)."""
    root1 = sqrtm_psd(sigma1)
    cross = sqrtm_psd(root1 @ sigma2 @ root1)
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross.trace())


def feature_statistics(features: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of (N, D) features, accumulated in float64 over row chunks (as NVlabs), so 50,000
    float32 features never need a float64 copy of themselves."""
    count, width = features.shape
    total = torch.zeros(width, dtype=torch.float64)
    products = torch.zeros(width, width, dtype=torch.float64)
    for start in range(0, count, chunk):
        rows = features[start:start + chunk].double()
        total += rows.sum(0)
        products += rows.T @ rows
    return mean_and_covariance(total, products, count)


def mean_and_covariance(total: torch.Tensor, products: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and (unbiased) covariance of ``count`` rows from their sum and the sum of their outer products."""
    mean = total / count
    return mean, (products - count * torch.outer(mean, mean)) / (count - 1)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """Kernel Inception Distance (Binkowski et al. 2018) as NVlabs computes it: the unbiased MMD² with the cubic
    polynomial kernel (x·y/d + 1)³, averaged over random subsets."""
    n = min(len(real), len(fake), subset_size)
    dim = real.shape[1]
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(subsets):
        x = fake[torch.randperm(len(fake), generator=generator)[:n]].double()
        y = real[torch.randperm(len(real), generator=generator)[:n]].double()
        a = (x @ x.T / dim + 1) ** 3 + (y @ y.T / dim + 1) ** 3
        b = (x @ y.T / dim + 1) ** 3
        total += float((a.sum() - a.diagonal().sum()) / (n - 1) - b.sum() * 2 / n)
    return total / subsets / n


def inception_score(probabilities: torch.Tensor, splits: int = 10) -> float:
    """Inception Score (Salimans et al. 2016) as NVlabs and BigGAN-PyTorch compute it: over ``splits`` equal
    parts of the (N, classes) probabilities, exp(mean KL(p(y|x) || p(y))), averaged over the parts."""
    probabilities = probabilities.double()
    count = len(probabilities)
    scores = []
    for i in range(splits):
        part = probabilities[i * count // splits:(i + 1) * count // splits]
        marginal = part.mean(dim=0, keepdim=True)
        kl = (part * (part.clamp_min(1e-30).log() - marginal.clamp_min(1e-30).log())).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return sum(scores) / len(scores)


def compute(names: list[str], real: torch.Tensor, fake: torch.Tensor, kid_subset_size: int = 1000,
            probabilities: torch.Tensor | None = None,
            real_statistics: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """The requested metrics of generated against real features (``fid``, ``kid``) and of the generated images'
    class ``probabilities`` (``is``); FID against ``real_statistics`` (mean, covariance) when given, e.g. a whole
    dataset's."""
    def fid_score() -> float:
        if real_statistics is None:
            return fid(real, fake)
        return frechet_distance(*(s.double().cpu() for s in real_statistics), *feature_statistics(fake))

    functions = {"fid": fid_score, "kid": lambda: kid(real, fake, subset_size=kid_subset_size),
                 "is": lambda: inception_score(probabilities)}
    return {name: functions[name]() for name in names}
