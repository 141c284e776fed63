"""Networks F(x, t, s[, cond]) that flow-map students and learned teachers wrap."""

from fewstep.networks.mlp import MLP, SinusoidalEmbedding

__all__ = ["MLP", "SinusoidalEmbedding"]
