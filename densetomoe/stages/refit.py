"""Closed-form refit of the experts' down projections (pure tensor math, no hooks or I/O).

Routing drops the unselected experts' output. Rather than only adding back a constant, the down
projections of the experts a token does use can be refit so that the sparse layer reproduces the
*dense* FFN output on calibration tokens, under exactly the routing and expert weights inference
will use. With the neurons fixed, the layer output is linear in the down projections:

    y(x) = W z(x),   z(x) = [w_1(x) 1{1 selected} a_1(x); ...; w_E(x) 1{E selected} a_E(x); a_shared(x)]

(``a_e`` the activations of expert ``e``'s neurons, ``w_e`` its routing weight), so the best ``W`` is a
ridge regression, solved per layer from the ``d_ff x d_ff`` Gram matrix:

    W^T = (Z^T Z + lambda I)^-1 (Z^T Y + lambda W0^T),   lambda = ridge * mean(diag(Z^T Z))

pulled towards the original weights ``W0``. At ``top_k == experts`` ``W0`` is already exact.
"""

from __future__ import annotations

import torch


class NormalEquations:
    """The sums a least-squares fit of ``targets ~ features W^T`` needs, gathered a chunk of tokens at a
    time, so that the ``(tokens, neurons)`` feature matrix never exists whole: ``G = Z^T Z``,
    ``C = Z^T Y`` and ``||Y||^2``. Products are computed in float32 per chunk (twice as fast as
    float64: at 8,192 neurons the Gram matrix is most of a layer's refit time) and summed in float64.

    Memory is the float64 Gram matrix, once: :meth:`solve` factorises it in place (512 MB at 8,192
    neurons), and :meth:`error` works before and after."""

    def __init__(self, neurons: int, outputs: int):
        self.gram = torch.zeros(neurons, neurons, dtype=torch.float64)  # G, or after solve() the factor L of G + ridge I
        self.cross = torch.zeros(neurons, outputs, dtype=torch.float64)
        self.target_norm2 = 0.0
        self.ridge = None  # the lambda of solve(), once the Gram matrix holds its factor

    def add(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """``features`` ``(tokens, neurons)``, ``targets`` ``(tokens, outputs)``."""
        if self.ridge is not None:
            raise RuntimeError("the equations were solved: nothing can be added")
        z, y = features.float(), targets.float()
        self.gram.add_(z.T @ z)  # summed in float64 without a float64 copy of the product
        self.cross.add_(z.T @ y)
        self.target_norm2 += float(y.double().square().sum())

    def solve(self, initial: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
        """``argmin_W ||Y - Z W^T||^2 + lambda ||W - initial||^2``, ``lambda = ridge * mean(diag G)``,
        ``initial`` ``(outputs, neurons)``; returned in its dtype. Solved in float64 by a Cholesky
        factorisation (the ridged system is symmetric positive definite, and well conditioned:
        solutions agree with an all-float64 refit to ~1e-7)."""
        if self.ridge is not None:
            raise RuntimeError("the equations were solved already")
        lam = ridge * float(self.gram.diagonal().mean().clamp_min(1e-12))
        self.gram.diagonal().add_(lam)
        torch.linalg.cholesky_ex(self.gram, out=(self.gram, torch.empty((), dtype=torch.int32)))  # in place: L, lower
        self.ridge = lam
        solution = torch.cholesky_solve(self.cross + lam * initial.double().T, self.gram)  # (neurons, outputs)
        return solution.T.to(initial.dtype).contiguous()

    def error(self, weights: torch.Tensor) -> float:
        """``||Z W^T - Y|| / ||Y||`` over the tokens added, from the sums alone (no second pass):
        ``||Z W^T - Y||^2 = tr(W G W^T) - 2 tr(W C) + ||Y||^2``, where after :meth:`solve`
        ``tr(W G W^T) = ||W L||^2 - lambda ||W||^2``."""
        w = weights.double()
        if self.ridge is None:
            quadratic = float(((w @ self.gram) * w).sum())
        else:
            quadratic = float((w @ self.gram).square().sum()) - self.ridge * float(w.square().sum())
        residual = quadratic - 2 * float((w * self.cross.T).sum()) + self.target_norm2
        return max(residual, 0.0) ** 0.5 / max(self.target_norm2, 1e-60) ** 0.5


def ridge_down(
    features: torch.Tensor, targets: torch.Tensor, initial: torch.Tensor, ridge: float = 1e-2, chunk: int = 4096
) -> torch.Tensor:
    """``argmin_W ||targets - features W^T||^2 + lambda ||W - initial||^2`` for features held in memory:
    ``features`` ``(tokens, neurons)``, ``targets`` ``(tokens, hidden)``, ``initial`` ``(hidden, neurons)``."""
    equations = NormalEquations(features.shape[1], targets.shape[1])
    for start in range(0, len(features), chunk):
        equations.add(features[start : start + chunk], targets[start : start + chunk])
    return equations.solve(initial, ridge)


def relative_error(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """``||prediction - target|| / ||target||`` over all tokens."""
    return float((prediction - target).double().norm() / target.double().norm().clamp_min(1e-30))
