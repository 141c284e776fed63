r"""The analytic Gaussian-mixture teacher: exact velocity, score, log-density and samples at every t.

For data :math:`p_0 = \sum_k w_k N(\mu_k, \Sigma_k)` and the path :math:`x_t = \alpha x_0 + \sigma x_1`,
every marginal is a mixture :math:`p_t = \sum_k w_k N(\alpha\mu_k, C_k)` with
:math:`C_k = \alpha^2\Sigma_k + \sigma^2 I`. With responsibilities :math:`r_k(x)` and
:math:`\delta_k = x - \alpha\mu_k`:

.. math::
    \nabla\log p_t = -\sum_k r_k C_k^{-1}\delta_k,\qquad
    v(x,t) = \sum_k r_k\big[\dot\alpha\mu_k + (\dot\alpha\alpha\Sigma_k + \dot\sigma\sigma I)C_k^{-1}\delta_k\big],

the second from :math:`E[x_0|x,k] = \mu_k + \alpha\Sigma_k C_k^{-1}\delta_k` and
:math:`E[x_1|x,k] = \sigma C_k^{-1}\delta_k`. Everything is evaluated in each component's eigenbasis
:math:`\Sigma_k = U_k \mathrm{diag}(\lambda_k) U_k^T`, so it is exact at t=0 and t=1 and costs
O(batch·K·d²). Computation runs in float64; results are cast back to the input dtype.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.core.paths import AffinePath, get_path
from fewstep.core.utils import TimeLike
from fewstep.teachers.base import Teacher

__all__ = ["GaussianMixtureTeacher"]


def _as64(x: Any) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


class GaussianMixtureTeacher(Teacher):
    """Exact teacher for a (optionally class-conditional) Gaussian mixture with full covariances.

    Args:
        weights: Mixture weights, shape (K,), non-negative, summing to 1.
        means: Component means, shape (K, d).
        covariances: Covariances, shape (K, d, d), symmetric positive definite.
        classes: Optional class of each component, shape (K,), integers 0..C-1; class c is then the
            sub-mixture of its components with renormalised weights.
        path: A path name ("linear", "cosine") or an :class:`AffinePath`.
        event_shape: Shape of one sample (default (d,)); e.g. (1, 8, 8) for digit images.

    Raises:
        ValueError: on wrong shapes, weights not summing to 1, or covariances that are not SPD.
    """

    def __init__(
        self,
        weights: Sequence[float] | Tensor,
        means: Sequence[Sequence[float]] | Tensor,
        covariances: Sequence[Any] | Tensor,
        classes: Sequence[int] | Tensor | None = None,
        path: str | AffinePath = "linear",
        event_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        try:
            w, mu, cov = _as64(weights), _as64(means), _as64(covariances)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"weights, means and covariances must be (nested lists of) numbers: {e}") from None
        for name, v in (("weights", w), ("means", mu), ("covariances", cov)):
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"mixture {name} must be finite numbers; got NaN or inf")
        if w.dim() != 1:
            raise ValueError(f"weights must have shape (K,); got {tuple(w.shape)}")
        k = w.shape[0]
        if mu.dim() != 2 or mu.shape[0] != k:
            raise ValueError(f"means must have shape ({k}, d); got {tuple(mu.shape)}")
        d = mu.shape[1]
        if cov.shape != (k, d, d):
            raise ValueError(f"covariances must have shape ({k}, {d}, {d}); got {tuple(cov.shape)}")
        if bool((w < 0).any()) or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must be non-negative and sum to 1; they sum to {float(w.sum()):.8g}")
        if not torch.allclose(cov, cov.transpose(1, 2), atol=1e-10 * max(1.0, float(cov.abs().max()))):
            raise ValueError("covariances must be symmetric")
        lam, vecs = torch.linalg.eigh(cov)
        if bool((lam <= 0).any()):
            bad = int((lam <= 0).any(dim=1).nonzero()[0])
            raise ValueError(f"covariance of component {bad} is not positive definite (min eigenvalue "
                             f"{float(lam[bad].min()):.3g})")
        self.path = get_path(path)
        self.event_shape = tuple(event_shape) if event_shape is not None else (d,)
        if math.prod(self.event_shape) != d:
            raise ValueError(f"event_shape {self.event_shape} does not have {d} elements")
        self.dim = d
        self.register_buffer("weights", w)
        self.register_buffer("means", mu)
        self.register_buffer("covariances", cov)
        self.register_buffer("eigvals", lam)
        self.register_buffer("eigvecs", vecs)
        if classes is not None:
            c = torch.as_tensor(classes, dtype=torch.long)
            if c.shape != (k,):
                raise ValueError(f"classes must have shape ({k},); got {tuple(c.shape)}")
            if bool((c < 0).any()):
                raise ValueError("classes must be non-negative integers")
            self.num_classes = int(c.max()) + 1
            missing = set(range(self.num_classes)) - set(c.tolist())
            if missing:
                raise ValueError(f"classes must be 0..C-1 with every class used; missing {sorted(missing)}")
            self.register_buffer("classes", c)
            self.register_buffer("class_weights", torch.zeros(self.num_classes, dtype=torch.float64)
                                 .index_add_(0, c, w))
        else:
            self.num_classes = None
            self.classes = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_dict(cls, spec: dict[str, Any], **kwargs: Any) -> GaussianMixtureTeacher:
        """Build from a dict with keys weights, means, covariances[, classes, path, event_shape]."""
        if not isinstance(spec, dict):
            raise ValueError(f"a mixture spec must be a JSON object, got {type(spec).__name__}")
        allowed = {"weights", "means", "covariances", "classes", "path", "event_shape", "name"}
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(f"unknown keys in mixture spec: {sorted(unknown)}; allowed {sorted(allowed)}")
        missing = {"weights", "means", "covariances"} - set(spec)
        if missing:
            raise ValueError(f"mixture spec is missing required keys {sorted(missing)}")
        args = {k: v for k, v in spec.items() if k != "name"}
        args.update(kwargs)
        return cls(**args)

    @classmethod
    def from_json(cls, path: str | Path, **kwargs: Any) -> GaussianMixtureTeacher:
        """Load a mixture from a JSON file with fields weights, means, covariances[, classes]."""
        try:
            spec = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(spec, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The mixture as a JSON-serialisable dict (round-trips through :meth:`from_dict`)."""
        out: dict[str, Any] = {
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "covariances": self.covariances.tolist(),
            "path": self.path.name,
            "event_shape": list(self.event_shape),
        }
        if self.classes is not None:
            out["classes"] = self.classes.tolist()
        return out

    def to_json(self, path: str | Path) -> None:
        """Write the mixture to a JSON file."""
        Path(path).write_text(json.dumps(self.to_dict()))

    # ------------------------------------------------------------------ exact quantities
    def _terms(self, x: Tensor, t: Tensor, cond: Tensor | None) -> dict[str, Tensor]:
        """Per-component quantities in the eigenbasis; x is (B, d) float64, t is (B,)."""
        a, s, da, ds = self.path.coefficients(t)
        a, s, da, ds = (c[:, None, None] for c in (a, s, da, ds))  # (B,1,1)
        delta = x[:, None, :] - a * self.means[None]  # (B,K,d)
        y = torch.einsum("kji,bkj->bki", self.eigvecs, delta)  # U^T delta
        var = a**2 * self.eigvals[None] + s**2  # (B,K,d)
        logn = -0.5 * ((y**2 / var).sum(-1) + torch.log(var).sum(-1) + self.dim * math.log(2 * math.pi))
        logits = torch.log(self.weights)[None] + logn  # (B,K)
        if cond is not None:
            keep = (self.classes[None, :] == cond[:, None]) | (cond[:, None] < 0)
            logits = logits.masked_fill(~keep, float("-inf"))
        return {"a": a, "s": s, "da": da, "ds": ds, "y": y, "var": var, "logits": logits}

    def _prep(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1).to(torch.float64)

    def _out(self, z: Tensor, like: Tensor) -> Tensor:
        return z.reshape(like.shape).to(like.dtype)

    def _velocity(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        tm = self._terms(self._prep(x), t.to(torch.float64), cond)
        r = torch.softmax(tm["logits"], dim=-1)  # (B,K)
        coef = (tm["da"] * tm["a"] * self.eigvals[None] + tm["ds"] * tm["s"]) * tm["y"] / tm["var"]
        v_k = tm["da"] * self.means[None] + torch.einsum("kij,bkj->bki", self.eigvecs, coef)
        return self._out((r[..., None] * v_k).sum(1), x)

    def exact_score(self, x: Tensor, t: TimeLike, cond: Tensor | None = None) -> Tensor:
        r"""Score :math:`-\sum_k r_k C_k^{-1}\delta_k` computed directly (finite at t=0)."""
        tt = self._check(x, t, cond)
        tm = self._terms(self._prep(x), tt.to(torch.float64), cond)
        r = torch.softmax(tm["logits"], dim=-1)
        sc = -torch.einsum("kij,bkj->bki", self.eigvecs, tm["y"] / tm["var"])
        return self._out((r[..., None] * sc).sum(1), x)

    def log_prob(self, x: Tensor, t: TimeLike = 0.0, cond: Tensor | None = None) -> Tensor:
        r"""Exact :math:`\log p_t(x\,|\,c)`, shape (batch,), float64-accurate, returned in x's dtype."""
        tt = self._check(x, t, cond)
        tm = self._terms(self._prep(x), tt.to(torch.float64), cond)
        lp = torch.logsumexp(tm["logits"], dim=-1)
        if cond is not None:
            norm = torch.where(cond < 0, torch.zeros_like(lp), torch.log(self.class_weights[cond.clamp(min=0)]))
            lp = lp - norm
        return lp.to(x.dtype)

    # ------------------------------------------------------------------ sampling
    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Class labels drawn from the class weights, shape (n,) (requires a class-conditional mixture)."""
        if self.num_classes is None:
            raise ValueError("sample_labels needs a class-conditional mixture")
        return torch.multinomial(self.class_weights.cpu(), n, replacement=True, generator=generator)

    def sample(self, n: int, t: float = 0.0, cond: Tensor | None = None, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, return_components: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Exact samples of p_t (or of p_t(.|c) when ``cond`` is given), shape (n, *event_shape).

        Args:
            n: Number of samples.
            t: Time in [0, 1]; t=0 gives data samples.
            cond: Optional labels of shape (n,) (-1 rows unconditional).
            generator: Optional torch.Generator (CPU) for reproducibility.
            dtype: Output dtype.
            return_components: Also return the component index of each sample.

        Returns:
            The samples, or (samples, component indices of shape (n,)) when ``return_components``.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"number of samples n must be an int >= 0; got {n!r}")
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"t must lie in [0, 1]; got {t}")
        logw = torch.log(self.weights.cpu()).expand(n, -1).clone()
        if cond is not None:
            if cond.shape != (n,):
                raise ValueError(f"cond must have shape ({n},); got {tuple(cond.shape)}")
            keep = (self.classes.cpu()[None, :] == cond.cpu()[:, None]) | (cond.cpu()[:, None] < 0)
            logw = logw.masked_fill(~keep, float("-inf"))
        comp = torch.multinomial(torch.softmax(logw, -1), 1, generator=generator)[:, 0]
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        std = self.eigvecs.cpu()[comp] @ (self.eigvals.cpu()[comp].sqrt() * z)[..., None]
        x0 = self.means.cpu()[comp] + std[..., 0]
        if float(t) > 0:
            tt = torch.full((n,), float(t), dtype=torch.float64)
            x1 = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
            x0 = self.path.interpolate(x0, x1, tt)
        out = x0.reshape(n, *self.event_shape).to(dtype=dtype, device=self.means.device)
        return (out, comp) if return_components else out

    def extra_repr(self) -> str:
        return (f"K={self.weights.shape[0]}, d={self.dim}, path={self.path.name}, "
                f"num_classes={self.num_classes}")
