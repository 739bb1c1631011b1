"""The multilayer perceptron built from the model, activation, norm, init and regularizer groups."""
from collections import OrderedDict
from functools import partial

from omegaconf import DictConfig, OmegaConf
from torch import nn

from dnnlab.components import make
from dnnlab.init import apply_init, variance_scaling

IN_FEATURES = 28 * 28


def widths(model: DictConfig) -> list[int]:
    n = model.n_neurons
    return [int(w) for w in n] if OmegaConf.is_list(n) else [int(n)] * model.n_hidden


def dropout_spec(reg: DictConfig):
    """(layer class, settings) of the configured dropout flavour, or None."""
    for key, cls in (("dropout", nn.Dropout), ("alpha_dropout", nn.AlphaDropout)):
        if reg.get(key) and reg[key].rate > 0:
            return cls, reg[key]
    return None


def dropout_rates(reg: DictConfig, n_hidden: int) -> list[float]:
    """Where dropout goes: its rate at each position, 0 the inputs and i the output of hidden layer i (the top
    top_k hidden layers, all by default, and the inputs with input=true)."""
    rates = [0.0] * (n_hidden + 1)
    spec = dropout_spec(reg)
    if spec:
        s = spec[1]
        rates[0] = s.rate if s.input else 0.0
        top_k = n_hidden if s.top_k is None else s.top_k
        for i in range(max(n_hidden - top_k, 0), n_hidden):
            rates[i + 1] = s.rate
    return rates


def build_mlp(cfg: DictConfig, n_classes: int) -> nn.Sequential:
    """Named blocks, so layers can be reused by name (transfer learning):
    input: Flatten [-> BN] [-> dropout];  hidden1..N: Linear -> (norm) -> act -> (norm) [-> dropout];  output: Linear.
    """
    norm, hidden = cfg.norm, widths(cfg.model)
    make_act = make(cfg.activation, "activation")
    drop = dropout_spec(cfg.regularizer)
    rates = dropout_rates(cfg.regularizer, len(hidden))
    norm_layer = {"batch": partial(nn.BatchNorm1d, momentum=norm.get("momentum")), "layer": nn.LayerNorm}.get(norm.kind)
    before = norm_layer is not None and norm.position == "before"
    bias = not (before and norm.kind == "batch")  # BN's shift makes the bias redundant; LayerNorm's does not

    stem: list[nn.Module] = [nn.Flatten()]
    if norm.input:
        stem.append(nn.BatchNorm1d(IN_FEATURES, momentum=norm.momentum, eps=norm.eps))
    if rates[0]:
        stem.append(drop[0](rates[0]))
    blocks, n_in = {"input": nn.Sequential(*stem)}, IN_FEATURES
    for i, width in enumerate(hidden):
        linear = nn.Linear(n_in, width, bias=bias)
        act = make_act(num_parameters=width) if make_act.func is nn.PReLU else make_act()  # Keras: a slope per unit
        block = [linear, act]
        if norm_layer is not None:
            block.insert(1 if before else 2, norm_layer(width, eps=norm.eps))
        if rates[i + 1]:
            block.append(drop[0](rates[i + 1]))
        blocks[f"hidden{i + 1}"] = nn.Sequential(*block)
        n_in = width
    out = blocks["output"] = nn.Linear(n_in, n_classes)
    apply_init([blocks[f"hidden{i + 1}"][0] for i in range(len(hidden))], cfg.init)
    variance_scaling(out.weight, 1.0, "fan_avg", "uniform")  # Keras' default (Glorot uniform), as the book's output layer
    nn.init.zeros_(out.bias)
    return nn.Sequential(OrderedDict(blocks))


def weight_matrices(model: nn.Module) -> list:
    """The kernels of every Linear layer (what Keras' kernel_regularizer sees); biases excluded."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def hidden_linears(model: nn.Module) -> list[nn.Linear]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[:-1]
