"""Networks F(x, t, s[, cond]) that flow-map students and learned teachers wrap."""

from fewstep.networks.dit import DiT
from fewstep.networks.factory import NETWORK_KINDS, build_network
from fewstep.networks.mlp import MLP, SinusoidalEmbedding
from fewstep.networks.unet import UNet

__all__ = ["MLP", "SinusoidalEmbedding", "UNet", "DiT", "NETWORK_KINDS", "build_network"]
