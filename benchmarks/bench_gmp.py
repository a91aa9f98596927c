"""Generalized max pooling: skpool against naive implementations, in the same run.

Compared, per (N, C) shape and batch size B:
- ``dual LU f32``: the deep-GMP reference layer's way: solve (ΦΦᵀ + λI) α = 1 by batched LU in
  float32, whatever N and C, then ξ = Φᵀα;
- ``skpool``: :func:`skpool._core.generalized_max_pool` with ``lam_scale="relative"`` and
  ``refine_steps="auto"``, the estimator's and the layer's defaults (Cholesky on the smaller
  Gram matrix, refinement or a float64 solve only where its error bound needs it);
- ``Gram only``: just the batched Gram matrix of the smaller side (a floor for any exact method);
- ``average``: average pooling, for scale.

Prints median times and the ratios skpool/Gram-only (target ≤ 1.5) and dual-LU/skpool (target
≥ 100 at (1024, 64)), plus the machine's f32 GEMM rate. ``--quick`` runs in well under a minute.

Run:  python benchmarks/bench_gmp.py [--quick] [--device cpu|cuda] [--lam-relative 1.0]
"""

from __future__ import annotations

import argparse

import torch

from _timing import describe, gemm_peak_gflops, median_time
from skpool import resolve_device
from skpool._core.gmp import generalized_max_pool

SHAPES = [(49, 2048), (441, 2048), (196, 512), (1024, 64)]


def dual_lu(phi, lam):
    """The reference layer's solve: dual system by LU in float32, then normalise."""
    gram = phi @ phi.transpose(1, 2)
    gram.diagonal(dim1=1, dim2=2).add_(lam)
    ones = phi.new_ones(phi.shape[0], phi.shape[1], 1)
    alpha = torch.linalg.solve(gram, ones)
    xi = (alpha.transpose(1, 2) @ phi)[:, 0]
    return xi / xi.norm(dim=1, keepdim=True)


def gram_only(phi):
    n, c = phi.shape[1:]
    return phi @ phi.transpose(1, 2) if n <= c else phi.transpose(1, 2) @ phi


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32 CPU, 256 GPU)")
    parser.add_argument("--lam-relative", type=float, default=1.0, help="λ / mean‖φ‖²")
    args = parser.parse_args()
    device = resolve_device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else (8 if args.quick else 32))
    repeats = 3 if args.quick else 7
    print(f"device: {describe(device)}; f32 GEMM {gemm_peak_gflops(device):.0f} GFLOP/s")
    print(f"batch {batch}, λ = {args.lam_relative:g} × mean‖φ‖², ReLU features, float32, median of {repeats}")
    header = f"{'N':>5} {'C':>5} | {'dual LU':>9} {'skpool':>9} {'Gram':>9} {'average':>9} | {'skpool/Gram':>11} {'LU/skpool':>9}"
    print(header)
    print("-" * len(header))
    for n, c in SHAPES:
        phi = torch.randn(batch, n, c, device=device).clamp_min_(0)
        lam = args.lam_relative * float(phi.square().sum(-1).mean())
        t_lu = median_time(lambda: dual_lu(phi, lam), device, repeats)
        # skpool as the estimator and the layer run it by default: λ relative to each
        # sample's mean squared norm, float32 refined (or solved in float64) where needed.
        t_sk = median_time(
            lambda: generalized_max_pool(
                phi, args.lam_relative, lam_scale="relative", refine_steps="auto"
            ),
            device,
            repeats,
        )
        t_gram = median_time(lambda: gram_only(phi), device, repeats)
        t_avg = median_time(lambda: phi.mean(dim=1), device, repeats)
        ms = [f"{1e3 * t:9.2f}" for t in (t_lu, t_sk, t_gram, t_avg)]
        print(f"{n:>5} {c:>5} | {' '.join(ms)} | {t_sk / t_gram:11.2f} {t_lu / t_sk:9.1f}")
    print("(times in ms)")


if __name__ == "__main__":
    main()
