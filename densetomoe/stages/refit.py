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


def ridge_down(
    features: torch.Tensor, targets: torch.Tensor, initial: torch.Tensor, ridge: float = 1e-2, chunk: int = 4096
) -> torch.Tensor:
    """``argmin_W ||targets - features W^T||^2 + lambda ||W - initial||^2``, solved in float64.

    ``features`` ``(tokens, neurons)``, ``targets`` ``(tokens, hidden)``, ``initial`` ``(hidden, neurons)``;
    returns ``(hidden, neurons)`` in ``initial``'s dtype. The products are summed in float32 chunks
    (twice as fast as float64: at 8,192 neurons the Gram matrix is most of a layer's refit time) and
    the system is solved in float64; the ridge keeps it well conditioned (solutions agree with an
    all-float64 refit to about 1e-7).
    """
    neurons = features.shape[1]
    gram = torch.zeros(neurons, neurons, dtype=torch.float64)
    cross = torch.zeros(neurons, targets.shape[1], dtype=torch.float64)
    for start in range(0, len(features), chunk):
        z = features[start : start + chunk].float()  # (chunk, neurons)
        gram += (z.T @ z).double()
        cross += (z.T @ targets[start : start + chunk].float()).double()
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    gram.diagonal().add_(lam)
    solution = torch.linalg.solve(gram, cross + lam * initial.double().T)  # (neurons, hidden)
    return solution.T.to(initial.dtype).contiguous()


def relative_error(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """``||prediction - target|| / ||target||`` over all tokens."""
    return float((prediction - target).double().norm() / target.double().norm().clamp_min(1e-30))
