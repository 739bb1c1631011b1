"""Weight initialisation: Keras' VarianceScaling (Glorot, He, LeCun are instances of it) and applying an init."""
import math

import torch
from omegaconf import DictConfig
from torch import nn

from dnnlab import activations


@torch.no_grad()
def variance_scaling(weight: torch.Tensor, scale: float = 1.0, mode: str = "fan_in",
                     distribution: str = "normal") -> torch.Tensor:
    """Fill `weight` (out, in) so that Var(w) = scale / fan, fan chosen by mode (Keras' VarianceScaling)."""
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    var = scale / fan
    if distribution == "uniform":  # U(-r, r) has variance r^2 / 3
        r = math.sqrt(3 * var)
        return weight.uniform_(-r, r)
    if distribution == "truncated_normal":  # cut at 2 std: divide by the cut normal's std so Var(w) stays `var`
        std = math.sqrt(var) / 0.87962566103423978
        return nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)
    return weight.normal_(0.0, math.sqrt(var))


@torch.no_grad()
def apply_init(layers: list[nn.Linear], cfg: DictConfig) -> None:
    """Initialise the weights of `layers` with the configured function and set their biases to cfg.bias."""
    from dnnlab.components import make

    fill = make({k: v for k, v in cfg.items() if k != "bias"}, "init")
    for layer in layers:
        fill(layer.weight)
        if layer.bias is not None:
            layer.bias.fill_(cfg.bias)


# The book's table of initializations per activation: {class path: (scale, fan mode)} for VarianceScaling, from
# dnnlab.activations; He for an activation it has no row for.
MATCHING = activations.matching_inits()


def matching(weight: torch.Tensor, activation: str, distribution: str = "normal") -> torch.Tensor:
    """The initialization the book pairs with `activation` (a torch class path): LeCun for SELU, Glorot for
    sigmoid, tanh and softplus, He for the ReLU family, ELU, GELU, Swish and Mish."""
    scale, mode = MATCHING.get(activation, (activations.HE.scale, activations.HE.mode))
    return variance_scaling(weight, scale, mode, distribution)
