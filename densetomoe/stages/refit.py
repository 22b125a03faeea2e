"""Closed-form refit of the experts' down projections, per layer, under the routing inference uses.

Routing drops the unselected experts' output. Rather than only adding back a constant, the down
projections of the experts a token does use can be refit so that the sparse layer reproduces the
*dense* FFN output on calibration tokens, under exactly the routing (and expert weights) inference
will use. With the neurons and the routing fixed, the layer output is linear in the down projections:

    y(x) = W z(x)

* densetomoe's own module (:func:`refit_experts`): ``z(x) = [1{1 selected} a_1(x); ...;
  1{E selected} a_E(x); 1{1 unselected}; ...; 1{E unselected}; a_shared(x)]``, so the experts' down
  projections, the mean outputs that stand in for unselected experts (any constant offset lies in
  their span: a token always skips ``E - k`` of them) and the shared expert's down projection are fit
  jointly;
* a native MoE (:func:`densetomoe.formats.qwen_moe.native_layer`): ``z(x) = [w_1(x) 1{1 selected} a_1(x);
  ...; a_shared(x)]`` with ``w_e`` the engines' routing weight;

(``a_e`` the activations of expert ``e``'s neurons), so the best ``W`` is a ridge regression, solved
per layer from the ``d_ff x d_ff`` Gram matrix:

    W^T = (Z^T Z + lambda I)^-1 (Z^T Y + lambda W0^T),   lambda = ridge * mean(diag(Z^T Z))

pulled towards the original weights ``W0``. At ``top_k == experts`` ``W0`` is already exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ffn import CHUNK, DenseFFN
from ..moe import MoEFeedForward

RIDGE = 0.1  # relative to the Gram matrix's mean diagonal (SmolLM2 layer 10, held-out: best of 1e-4..1)
SLICE = 1024  # rows at a time where a product would otherwise be as large as a weight matrix


@dataclass
class LayerFit:
    """What the refit did to one MoE layer: relative FFN output error on the calibration tokens."""

    error_before: float
    error_after: float


class NormalEquations:
    """The sums a least-squares fit of ``targets ~ features W^T`` needs, gathered a chunk of tokens at a
    time, so that the ``(tokens, neurons)`` feature matrix never exists whole: ``G = Z^T Z``,
    ``C = Z^T Y`` and ``||Y||^2``.

    Memory is the float32 Gram matrix, once: :meth:`solve` factorises it in place (256 MB at 8,192
    neurons, 822 MB at LLaMA-3-8B's 14,336, 3.3 GB at LLaMA-70B's 28,672), and :meth:`error` works
    before and after. Float32 is enough: the ridge keeps the system well conditioned (the solution
    agrees with a float64 one to ~1e-6), and the products of each chunk are float32 anyway."""

    def __init__(self, neurons: int, outputs: int):
        self.gram = torch.zeros(neurons, neurons)  # G, or after solve() the factor L of G + ridge I
        self.cross = torch.zeros(neurons, outputs, dtype=torch.float64)
        self.target_norm2 = 0.0
        self.ridge = None  # the lambda of solve(), once the Gram matrix holds its factor

    def add(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """``features`` ``(tokens, neurons)``, ``targets`` ``(tokens, outputs)``."""
        if self.ridge is not None:
            raise RuntimeError("the equations were solved: nothing can be added")
        z, y = features.float(), targets.float()
        self.gram.addmm_(z.T, z)  # in place: no second Gram-sized temporary
        for first in range(0, z.shape[1], SLICE):  # in float64, a slice of neurons at a time
            self.cross[first : first + SLICE].add_(z[:, first : first + SLICE].T @ y)
        self.target_norm2 += float(y.double().square().sum())

    def solve(self, initial: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
        """``argmin_W ||Y - Z W^T||^2 + lambda ||W - initial||^2``, ``lambda = ridge * mean(diag G)``,
        ``initial`` ``(outputs, neurons)``; returned in its dtype (a transposed view), solved by a
        Cholesky factorisation in place (the ridged system is symmetric positive definite)."""
        if self.ridge is not None:
            raise RuntimeError("the equations were solved already")
        lam = ridge * float(self.gram.diagonal().double().mean().clamp_min(1e-12))
        self.gram.diagonal().add_(lam)
        torch.linalg.cholesky_ex(self.gram, out=(self.gram, torch.empty((), dtype=torch.int32)))  # in place: L, lower
        self.ridge = lam
        rhs = self.cross.float().add_(initial.T.float(), alpha=lam)  # (neurons, outputs), in float32 as the factor is
        return torch.cholesky_solve(rhs, self.gram).T.to(initial.dtype)  # a transposed view: no copy

    def error(self, weights: torch.Tensor) -> float:
        """``||Z W^T - Y|| / ||Y||`` over the tokens added, from the sums alone (no second pass):
        ``||Z W^T - Y||^2 = tr(W G W^T) - 2 tr(W C) + ||Y||^2``, where after :meth:`solve`
        ``tr(W G W^T) = ||W L||^2 - lambda ||W||^2``."""
        quadratic = linear = 0.0
        w = weights.float()
        for first in range(0, len(w), SLICE):  # a few output rows at a time: no Gram-sized temporary
            rows = w[first : first + SLICE]  # (rows, neurons)
            product = rows @ self.gram
            if self.ridge is None:
                quadratic += float((product * rows).sum(dtype=torch.float64))
            else:
                quadratic += float(product.square().sum(dtype=torch.float64) - self.ridge * rows.square().sum(dtype=torch.float64))
            linear += float((rows.double() * self.cross[:, first : first + SLICE].T).sum())
        residual = quadratic - 2 * linear + self.target_norm2
        return max(residual, 0.0) ** 0.5 / max(self.target_norm2, 1e-60) ** 0.5


@torch.no_grad()
def refit_experts(
    module: MoEFeedForward,
    ffn: DenseFFN,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    ridge: float = RIDGE,
    offsets: bool = True,
) -> LayerFit:
    """Refit, in place, ``module``'s experts' down projections, its ``skip_mean`` and its shared expert's
    down projection to reproduce ``targets`` (default: the dense ``ffn``'s output, less its down bias,
    which the module adds as it is) on the FFN ``inputs`` ``(tokens, hidden)``, under the module's own
    routing, fixed or dynamic top-k (``offsets=False``: ``skip_mean`` is left as it is). Nothing
    changes where every token takes every expert: the module is already exact. The errors reported are relative to the FFN
    output without its down bias."""
    experts, size, hidden = module.num_experts, module.expert_size, module.hidden_size
    parts = [module.w_down.detach().float().reshape(-1, hidden).T]
    if offsets:
        parts.append(module.skip_mean.detach().float().T)
    if module.shared_size:
        parts.append(module.shared_down.detach().float().T)
    initial = torch.cat(parts, dim=1)  # (hidden, routed neurons + experts + shared neurons)
    equations = NormalEquations(initial.shape[1], hidden)
    for start in range(0, len(inputs), CHUNK):
        x = inputs[start : start + CHUNK].float()
        if targets is None:
            y = ffn.neurons(x) @ ffn.w_down.T
        else:
            y = targets[start : start + CHUNK].float()
        selected = module.selection(x)  # (tokens, experts)
        a = module._neurons(x, slice(None)).float().reshape(len(x), experts, size)
        features = [(a * selected.unsqueeze(-1)).reshape(len(x), -1)]
        if offsets:
            features.append(1.0 - selected)
        else:  # the fixed means of the unselected experts are part of the output, not of the fit
            y = y - (1.0 - selected) @ module.skip_mean.detach().float()
        if module.shared_size:
            features.append(module._shared_neurons(x).float())
        equations.add(torch.cat(features, dim=1), y)
    before = equations.error(initial)
    if not module.sparse:
        return LayerFit(before, before)
    fitted = equations.solve(initial, ridge)
    routed = experts * size
    module.w_down.copy_(fitted[:, :routed].T.reshape(experts, size, hidden))
    if offsets:
        module.skip_mean.copy_(fitted[:, routed : routed + experts].T)
        routed += experts
    if module.shared_size:
        module.shared_down.copy_(fitted[:, routed:].T)
    return LayerFit(before, equations.error(fitted))


def relative_error(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """``||prediction - target|| / ||target||`` over all tokens."""
    return float((prediction - target).double().norm() / target.double().norm().clamp_min(1e-30))
