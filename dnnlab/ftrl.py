"""FTRL-Proximal as a torch optimizer, with Keras' arguments and update (torch has no FTRL).

The chapter names three ways to a sparse model: drive small weights to zero after training, train with a strong
l1 penalty, or use a dual-averaging optimizer such as FTRL with l1. FTRL's l1 gives exact zeros.

The update rule is McMahan et al. 2013, "Ad Click Prediction: a View from the Trenches" (KDD), Algorithm 1
(per-coordinate FTRL-Proximal with L1 and L2 regularization), for every coordinate i and gradient g_i:

    sigma_i = (sqrt(n_i + g_i^2) - sqrt(n_i)) / alpha
    z_i    <- z_i + g_i - sigma_i * w_i
    n_i    <- n_i + g_i^2
    w_i    <- 0                                                          if |z_i| <= lambda_1
              -(z_i - sign(z_i) * lambda_1) / ((beta + sqrt(n_i)) / alpha + lambda_2)   otherwise

As Keras (tf.keras.optimizers.Ftrl, TensorFlow's ApplyFtrlV2) generalises it:
- `learning_rate_power` p (-0.5 above): sqrt(n) becomes n^(-p);
- `initial_accumulator_value`: n starts there instead of 0 (z, Keras' "linear", starts at 0);
- `l1` = lambda_1; `l2` is Keras' l2_regularization_strength, a penalty l2 * w^2, so lambda_2 = 2 * l2;
  `beta` adds beta / alpha to the denominator (as in the paper);
- `l2_shrinkage`: the gradient entering z is g + 2 * l2_shrinkage * w (n still accumulates g^2);
- w is overwritten by the closed form at every step. Like Keras, the step starts from the current weights, so
  the first step keeps only the fraction 1 - sqrt(n_0 / n_1) of the initial weights: FTRL (made for wide linear
  models that start at zero) mostly forgets an initialisation; the gradients break the symmetry.

`weight_decay` (default 0) adds torch's L2 term weight_decay * w to the gradient, as every dnnlab optimizer has it.
"""
from __future__ import annotations

import torch


class Ftrl(torch.optim.Optimizer):
    """FTRL-Proximal (McMahan et al. 2013) with Keras' defaults: lr 0.001, learning_rate_power -0.5,
    initial_accumulator_value 0.1, l1 = l2 = l2_shrinkage = beta = 0."""

    def __init__(self, params, lr: float = 0.001, learning_rate_power: float = -0.5,
                 initial_accumulator_value: float = 0.1, l1: float = 0.0, l2: float = 0.0,
                 l2_shrinkage: float = 0.0, beta: float = 0.0, weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if learning_rate_power > 0:
            raise ValueError(f"learning_rate_power must be <= 0, got {learning_rate_power}")
        for name, value in (("initial_accumulator_value", initial_accumulator_value), ("l1", l1), ("l2", l2),
                            ("l2_shrinkage", l2_shrinkage), ("beta", beta), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        defaults = dict(lr=lr, learning_rate_power=learning_rate_power,
                        initial_accumulator_value=initial_accumulator_value, l1=l1, l2=l2,
                        l2_shrinkage=l2_shrinkage, beta=beta, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, power = group["lr"], -group["learning_rate_power"]  # power = -p >= 0
            l1 = group["l1"]
            l2 = group["l2"] + group["beta"] / (2.0 * lr)  # Keras: beta enters as an extra l2 of beta / (2 lr)
            for w in group["params"]:
                if w.grad is None:
                    continue
                if w.grad.is_sparse:
                    raise RuntimeError("Ftrl does not support sparse gradients")
                state = self.state[w]
                if not state:
                    state["accumulator"] = torch.full_like(w, group["initial_accumulator_value"],
                                                           memory_format=torch.preserve_format)
                    state["linear"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                g = w.grad
                if group["weight_decay"]:
                    g = g.add(w, alpha=group["weight_decay"])
                n, z = state["accumulator"], state["linear"]
                n_new = n + g * g
                g_shrunk = g.add(w, alpha=2.0 * group["l2_shrinkage"]) if group["l2_shrinkage"] else g
                sigma = (n_new.pow(power) - n.pow(power)) / lr
                z.add_(g_shrunk - sigma * w)
                quadratic = n_new.pow(power) / lr + 2.0 * l2
                # w = (clip(z, -l1, l1) - z) / quadratic: zero when |z| <= l1, else -(z - sign(z) l1) / quadratic
                numerator = z.clamp(-l1, l1) - z
                w.copy_(torch.where(quadratic > 0, numerator / quadratic.clamp_min(torch.finfo(w.dtype).tiny),
                                    torch.zeros_like(w)))
                n.copy_(n_new)
        return loss
