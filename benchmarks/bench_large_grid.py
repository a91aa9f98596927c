"""Large grids: the truncated-support solve against the exact one, speed and angle.

The separability operator's solve costs one N×N factorisation per output location (N = H·W),
which on a 64×64 grid (N = 4096, M = 1024 with stride 2) is minutes on a CPU. With
``support_radius`` ρ each location solves an n×n problem on the input locations within ρ of
its centre (n ≈ πρ²), and its row is exactly zero elsewhere.

1. Speed, 64×64 grid (C=8, K=200, Q=10, stride 2, top-1): the truncated solve for several
   radii against the exact solve — timed on a subset of locations and extrapolated to all M
   (labelled) unless ``--full-exact``.
2. Accuracy, 32×32 grid (same C, K, Q, stride; the exact solve is affordable there): the angle
   between every truncated row and the exact row, for several α and radii, and the fraction of
   the exact separability ratio the truncated rows keep. Also the measured (not extrapolated)
   speed-up on that grid.

Data: class means that differ at every location (C channels), plus unit noise, channels
normalised. The statistics are computed once; only the solve is timed.

Run:  python benchmarks/bench_large_grid.py [--quick] [--device cpu|cuda] [--dtype float32]
      [--full-exact]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _timing import describe, gemm_peak_gflops, median_time, synchronize
from skpool import resolve_device
from skpool._core.solve import top_generalized_eigenvectors
from skpool._core.grid import inside_radius, locality_costs, output_grid_shape
from skpool._core.scatter import ScatterStatistics, class_weights_from_labels


def statistics(grid, n_channels, n_samples, n_classes, dtype, device, seed=0):
    """Scatter statistics of normalised random maps with class-dependent means."""
    rng = np.random.default_rng(seed)
    n_locations = grid[0] * grid[1]
    labels = np.arange(n_samples) % n_classes
    means = 0.5 * rng.standard_normal((n_classes, n_locations, n_channels))
    stacks = means[labels] + rng.standard_normal((n_samples, n_locations, n_channels))
    stacks = (stacks - stacks.mean(axis=(0, 1))) / stacks.std(axis=(0, 1))
    codes = torch.as_tensor(labels, device=device)
    weights = class_weights_from_labels(codes, n_classes, dtype=dtype)
    features = torch.as_tensor(stacks, dtype=dtype, device=device)
    return ScatterStatistics.from_batch(features, codes, weights)


def problem(grid, args, dtype, device):
    """The statistics and locality costs (M, N) of a grid, with the benchmark's sizes."""
    stats = statistics(grid, args.channels, args.samples, args.classes, dtype, device)
    out = output_grid_shape(grid, args.stride)
    return stats, locality_costs(grid, out, dtype=dtype, device=device)


def largest_support(costs, radius) -> int:
    return int(inside_radius(costs, radius).sum(dim=1).max())


def solve(stats, costs, alpha, radius):
    return top_generalized_eigenvectors(
        stats.between_factor(), stats.within, costs, alpha, 1, support_radius=radius
    )


def timed(fn, device, repeats):
    if repeats <= 1:
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        return time.perf_counter() - start, result
    holder = {}
    seconds = median_time(lambda: holder.update(result=fn()), device, repeats=repeats, warmup=1)
    return seconds, holder["result"]


def row_angles(rows, exact):
    cosine = (rows * exact).sum(-1).abs() / (rows.norm(dim=-1) * exact.norm(dim=-1))
    return torch.arccos(cosine.clamp(max=1.0)).double().cpu().numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--quick", action="store_true", help="fewer radii, alphas and repeats")
    parser.add_argument(
        "--full-exact", action="store_true", help="solve all 64x64 locations exactly"
    )
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--timed-locations", type=int, default=16)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    radii = (6.0, 8.0) if args.quick else (4.0, 6.0, 8.0, 12.0)
    alphas = (1000.0,) if args.quick else (1.0, 100.0, 1000.0)
    repeats = 1 if args.quick else 3
    timed_locations = 2 if args.quick else args.timed_locations

    print(f"device: {describe(device)}; f32 GEMM {gemm_peak_gflops(device):.0f} GFLOP/s")
    print(f"solve dtype {args.dtype}, C={args.channels}, K={args.samples}, Q={args.classes}, "
          f"stride {args.stride}, top-1\n")

    # --- 1. speed on 64x64 -------------------------------------------------------------
    grid = (64, 64)
    stats, costs = problem(grid, args, dtype, device)
    m, n = costs.shape
    print(f"1. grid {grid[0]}x{grid[1]} (N={n}), M={m}, r={stats.between_factor().shape[1]}")
    if args.full_exact:
        t_exact, _ = timed(lambda: solve(stats, costs, 1.0, None), device, 1)
        exact_label = "exact (all locations)"
    else:
        subset = costs[:timed_locations]
        t_subset, _ = timed(lambda: solve(stats, subset, 1.0, None), device, 1)
        t_exact = t_subset * m / timed_locations
        exact_label = f"exact (extrapolated from {timed_locations} loc.)"
    print(f"   {'solve':<36} {'n':>6} {'seconds':>9} {'speed-up':>9}")
    print(f"   {exact_label:<36} {n:>6} {t_exact:9.2f} {1.0:8.1f}x")
    for radius in radii:
        size = largest_support(costs, radius)
        seconds, _ = timed(lambda: solve(stats, costs, 1.0, radius), device, repeats)
        label = f"truncated, radius {radius:g}"
        print(f"   {label:<36} {size:>6} {seconds:9.3f} {t_exact / seconds:8.1f}x")

    # --- 2. accuracy on 32x32 -------------------------------------------------------------
    grid = (32, 32)
    stats, costs = problem(grid, args, dtype, device)
    m, n = costs.shape
    print(f"\n2. grid {grid[0]}x{grid[1]} (N={n}), M={m}: truncated rows against the exact rows")
    print(f"   {'alpha':>7} {'radius':>6} {'n':>5} {'max angle':>10} {'median':>9} "
          f"{'min ratio kept':>15} {'exact s':>8} {'trunc. s':>9} {'speed-up':>9}")
    for alpha in alphas:
        t_exact, (exact, exact_values) = timed(
            lambda: solve(stats, costs, alpha, None), device, 1
        )
        for radius in radii:
            size = largest_support(costs, radius)
            seconds, (rows, values) = timed(
                lambda: solve(stats, costs, alpha, radius), device, repeats
            )
            angle = row_angles(rows[0], exact[0])
            kept = float((values[0] / exact_values[0]).min())
            print(
                f"   {alpha:7g} {radius:6g} {size:5d} {angle.max():10.3f} "
                f"{np.median(angle):9.4f} {kept:15.3f} {t_exact:8.2f} {seconds:9.3f} "
                f"{t_exact / seconds:8.1f}x"
            )
    print("\n   angles in radians; 'ratio kept' = truncated / exact separability ratio of the row "
          "(worst location).")


if __name__ == "__main__":
    main()
