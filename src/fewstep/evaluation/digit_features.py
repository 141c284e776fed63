r"""Fréchet distance in the feature space of a small digit classifier (a FID for sklearn's 8×8 digits).

:class:`DigitFeatureNet` is an MLP 64-128-64-10 trained once (cached) on a stratified 75 % split of sklearn's
1797 digits; :func:`frechet_digits` is :func:`fewstep.evaluation.metrics.frechet_distance` of its 64-d penultimate
features, and :func:`frechet_digits_floor` the real-vs-real value at the same sample size.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

from fewstep.evaluation.metrics import frechet_distance

__all__ = ["DigitFeatureNet", "digit_feature_net", "fit_classifier", "frechet_digits", "frechet_digits_floor"]


class DigitFeatureNet(nn.Module):
    """Classifier MLP 64 → 128 → 64 → 10 (ReLU) on 8×8 digits scaled to [-1, 1]; features = the 64-d
    penultimate activations."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features, shape (n, 64); x has 64 elements per row (any event shape)."""
        return self.body(x.reshape(x.shape[0], -1).to(self.head.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn digits as x/8 - 1 (the scaling of the digits preset), stratified 75/25 split, random_state 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 8.0 - 1.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    itr, ite = train_test_split(range(len(y)), test_size=0.25, random_state=0, stratify=y.numpy())
    return x[itr], y[itr], x[ite], y[ite]


@lru_cache(maxsize=1)
def digit_feature_net(seed: int = 0, epochs: int = 60) -> tuple[DigitFeatureNet, float]:
    """Train (once, cached) the digit classifier with Adam on the train split; returns (net, test accuracy)."""
    xtr, ytr, xte, yte = _digits_split()
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitFeatureNet()
    return net, fit_classifier(net, xtr, ytr, xte, yte, epochs, gen)


def fit_classifier(net: nn.Module, xtr: Tensor, ytr: Tensor, xte: Tensor, yte: Tensor, epochs: int,
                   generator: torch.Generator, batch_size: int = 64) -> float:
    """Train ``net`` in place with Adam (lr 2e-3, weight decay 1e-4) and cross-entropy on shuffled mini-batches.

    Args:
        net: Classifier returning logits; left in eval mode without gradients.
        xtr: Training inputs.
        ytr: Training labels.
        xte: Test inputs.
        yte: Test labels.
        epochs: Passes over the training set.
        generator: Generator of the per-epoch permutations.
        batch_size: Mini-batch size.

    Returns:
        The test-split accuracy.
    """
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], generator=generator)
        for i in range(0, xtr.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)
    with torch.no_grad():
        return float((net(xte).argmax(1) == yte).float().mean())


def frechet_digits(x: Tensor, y: Tensor) -> float:
    """Fréchet distance between the :class:`DigitFeatureNet` features of two sets of 64-pixel digits."""
    net, _ = digit_feature_net()
    if x[0].numel() != 64 or y[0].numel() != 64:
        raise ValueError(f"frechet_digits needs 64-pixel samples; got {x[0].numel()} and {y[0].numel()} elements")
    with torch.no_grad():
        return frechet_distance(net.features(x.detach().cpu()), net.features(y.detach().cpu()))


def frechet_digits_floor(n: int = 898, seed: int = 0) -> float:
    """Real-vs-real floor: Fréchet-digits between two disjoint random halves of the 1797 real digits,
    ``min(n, 898)`` images each (the value a perfect sampler gets at that sample size)."""
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().data, dtype=torch.float32) / 8.0 - 1.0
    m = min(int(n), x.shape[0] // 2)
    if m < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return frechet_digits(x[perm[:m]], x[perm[m:2 * m]])
