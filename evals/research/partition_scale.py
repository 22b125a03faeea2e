"""How long the default partition takes per layer at LLaMA sizes, and how much memory it needs.

Times one ``coactivation`` partition (:func:`densetomoe.stages.partition.by_coactivation`: the
layer's activations on the sampled calibration tokens, then balanced spherical k-means of the
neurons into experts) of a random SwiGLU layer on random inputs, fixed seed. Each size runs in a
fresh process, so its peak RSS is its own; "layer MB" is the RSS before the call (the layer's three
weight matrices and the inputs), "peak MB" the most the process held. The time is split into the
activations (``ffn.neurons``), the assignment steps (``balanced_assign``, every k-means iteration)
and the rest of k-means (normalising, seeding, similarities, centroids).

    python evals/research/partition_scale.py         # d_ff 14336 (LLaMA-3-8B) and 28672 (LLaMA-70B), 16 experts
    python evals/research/partition_scale.py --d-ff 4096 --experts 8 --hidden 1024
    python evals/research/partition_scale.py --old   # then the former n x n exact assignment (scipy) against
                                                     # today's, one k-means assignment step at d_ff 1536/4096/8192

``--old`` needs scipy (``pip install scipy``); it times a single assignment step on both sides, since
the former solver, cubic in d_ff, takes minutes per step at 8192 and k-means runs up to 12 steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from densetomoe.ffn import DenseFFN
from densetomoe.stages import partition
from densetomoe.stages.calibrate import LayerStats


def random_layer(d_ff: int, hidden: int, samples: int, seed: int) -> tuple[DenseFFN, LayerStats]:
    """A SwiGLU layer with N(0, 1/hidden) weights and N(0, 1) inputs (LLaMA's FFN shape)."""
    g = torch.Generator().manual_seed(seed)
    ffn = DenseFFN(
        w_up=torch.randn(d_ff, hidden, generator=g) / hidden**0.5,
        b_up=None,
        w_down=torch.randn(hidden, d_ff, generator=g) / d_ff**0.5,
        b_down=None,
        activation=torch.nn.SiLU(),
        w_gate=torch.randn(d_ff, hidden, generator=g) / hidden**0.5,
    )
    inputs = torch.randn(samples, hidden, generator=g)  # (samples, hidden)
    return ffn, LayerStats(inputs=inputs, tokens=samples, mean_abs=torch.zeros(d_ff), fire_rate=torch.zeros(d_ff))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(d_ff: int, experts: int, hidden: int, samples: int, seed: int) -> dict:
    """One timed ``by_coactivation`` call, in this process."""
    ffn, stats = random_layer(d_ff, hidden, samples, seed)
    spent = {"activations": 0.0, "assignment": 0.0}

    def timed(name, fn):
        def wrapper(*args):
            start = time.perf_counter()
            out = fn(*args)
            spent[name] += time.perf_counter() - start
            return out

        return wrapper

    ffn.neurons = timed("activations", ffn.neurons)
    partition.balanced_assign = timed("assignment", partition.balanced_assign)  # looked up by balanced_kmeans
    layer = peak_mb()
    start = time.perf_counter()
    labels = partition.by_coactivation(ffn, stats, experts, torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    assert torch.bincount(labels, minlength=experts).tolist() == [d_ff // experts] * experts
    return dict(d_ff=d_ff, experts=experts, seconds=seconds, **spent, layer_mb=layer, peak_mb=peak_mb())


def old_exact_assign(similarity: torch.Tensor) -> torch.Tensor:
    """The former solver: scipy's Hungarian method on the n x n matrix of each cluster repeated n / k times."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    n, k = similarity.shape
    cost = -np.repeat(similarity.double().numpy(), n // k, axis=1)  # (n, n)
    rows, slots = linear_sum_assignment(cost)
    labels = torch.empty(n, dtype=torch.long)
    labels[torch.from_numpy(rows)] = torch.from_numpy(slots // (n // k))
    return labels


def compare_old(d_ff: int, experts: int, hidden: int, samples: int, seed: int) -> dict:
    """One assignment step, old and new, on the similarity of the neurons to ``experts`` random neurons."""
    ffn, stats = random_layer(d_ff, hidden, samples, seed)
    x = torch.nn.functional.normalize(ffn.neurons(stats.inputs).abs().T, dim=1)  # (d_ff, samples)
    pick = torch.randperm(d_ff, generator=torch.Generator().manual_seed(seed))[:experts]
    similarity = x @ x[pick].T  # (d_ff, experts)
    result = dict(d_ff=d_ff, experts=experts)
    for name, solve in (("old", old_exact_assign), ("new", partition.balanced_assign)):
        start = time.perf_counter()
        labels = solve(similarity)
        result[f"{name}_seconds"] = time.perf_counter() - start
        result[f"{name}_total"] = similarity.double()[torch.arange(d_ff), labels].sum().item()
    return result


def in_fresh_process(args: argparse.Namespace, d_ff: int, old: bool) -> dict:
    command = [sys.executable, __file__, "--child", "--d-ff", str(d_ff), "--experts", str(args.experts)]
    command += ["--hidden", str(args.hidden), "--samples", str(args.samples), "--seed", str(args.seed), "--threads", str(args.threads)]
    done = subprocess.run(command + (["--old"] if old else []), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-ff", type=int, nargs="+", default=[14336, 28672])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=8192, help="calibration tokens kept per layer (the recipe's sample_tokens)")
    parser.add_argument("--old", action="store_true", help="also time the former n x n exact assignment against today's")
    parser.add_argument("--old-d-ff", type=int, nargs="+", default=[1536, 4096, 8192])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        run = compare_old if args.old else measure
        print(json.dumps(run(args.d_ff[0], args.experts, args.hidden, args.samples, args.seed)))
        return

    print(f"by_coactivation on a random SwiGLU layer: hidden {args.hidden}, {args.samples} sampled tokens, {args.threads} threads\n")
    print(f"{'d_ff':>6} {'experts':>7} {'seconds':>8} {'activations':>11} {'assignment':>10} {'rest':>6} {'layer MB':>9} {'peak MB':>8}")
    for d_ff in args.d_ff:
        r = in_fresh_process(args, d_ff, old=False)
        rest = r["seconds"] - r["activations"] - r["assignment"]
        print(
            f"{d_ff:>6} {r['experts']:>7} {r['seconds']:>8.1f} {r['activations']:>11.1f} {r['assignment']:>10.1f} "
            f"{rest:>6.1f} {r['layer_mb']:>9.0f} {r['peak_mb']:>8.0f}",
            flush=True,
        )
    if not args.old:
        return
    print("\none assignment step (the similarity of every neuron to random neurons), former exact solver vs today's\n")
    print(f"{'d_ff':>6} {'experts':>7} {'old s':>8} {'new s':>8} {'old - new total':>16}")
    for d_ff in args.old_d_ff:
        r = in_fresh_process(args, d_ff, old=True)
        gap = r["old_total"] - r["new_total"]
        print(f"{d_ff:>6} {r['experts']:>7} {r['old_seconds']:>8.2f} {r['new_seconds']:>8.3f} {gap:>16.2e}", flush=True)


if __name__ == "__main__":
    main()
