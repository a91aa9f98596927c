"""The batched factorisations and solves under the GMP layer, at 1 and 2 (or more) threads.

What limits the GMP layer's training step at small shapes (issue 26) is the batched
factorisation of B ridge systems of size n: skpool factors them by Cholesky, the official Deep
GMP layer's algorithm by LU (``torch.linalg.solve``). This script times, for B = 64 float32
SPD matrices (ReLU Gram matrices plus their mean diagonal) of n = 49, 64, 196:

- ``cholesky_ex`` (skpool's factorisation) and ``lu_factor_ex`` (the official algorithm's);
- one solve with the Cholesky factor by ``torch.cholesky_solve`` and by two batched
  ``torch.linalg.solve_triangular`` calls (what skpool uses);

at each thread count in its own process (``OMP_NUM_THREADS``: this script never calls
``torch.set_num_threads``, after which batched LU hangs or corrupts its pivots in torch
2.13.0+cpu). Medians of interleaved repeats (every arm once per repeat), in ms; compare the
columns of one run, on an otherwise idle machine.

Run:  python benchmarks/bench_factorisation.py [--threads 1 2] [--repeats 100] [--quick]
(``--device`` takes only ``cpu``: the question is torch's CPU LAPACK path.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SIZES = (49, 64, 196)
BATCH = 64


def measure(repeats: int) -> None:
    """One process: the table for its own thread count."""
    import torch

    from _timing import describe

    print(f"{describe(torch.device('cpu'))}; torch {torch.__version__}")
    print(f"{'n':>4} | {'cholesky_ex':>11} {'lu_factor_ex':>12} {'chol/lu':>7} | "
          f"{'cholesky_solve':>14} {'2 x solve_triangular':>20}")
    for n in SIZES:
        generator = torch.Generator().manual_seed(n)
        phi = torch.randn(BATCH, n, 2 * n, generator=generator).clamp_min(0)
        system = phi @ phi.mT
        system.diagonal(dim1=1, dim2=2).add_(system.diagonal(dim1=1, dim2=2).mean())
        factor, _ = torch.linalg.cholesky_ex(system)
        rhs = torch.ones(BATCH, n, 1)

        def triangular():
            lower = torch.linalg.solve_triangular(factor, rhs, upper=False)
            return torch.linalg.solve_triangular(factor.mT, lower, upper=True)

        arms = {
            "chol": lambda: torch.linalg.cholesky_ex(system),
            "lu": lambda: torch.linalg.lu_factor_ex(system),
            "cholesky_solve": lambda: torch.cholesky_solve(rhs, factor),
            "triangular": triangular,
        }
        for run in arms.values():  # warm-up
            run()
        times = {name: [] for name in arms}
        for _ in range(repeats):
            for name, run in arms.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
        print(f"{n:>4} | {ms['chol']:11.3f} {ms['lu']:12.3f} {ms['chol'] / ms['lu']:6.2f}x | "
              f"{ms['cholesky_solve']:14.3f} {ms['triangular']:20.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=None, help="default 100 (--quick: 20)")
    parser.add_argument("--quick", action="store_true", help="20 repeats")
    parser.add_argument("--device", choices=["cpu"], default="cpu",
                        help="cpu only: torch's CPU LAPACK path is what is compared")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (20 if args.quick else 100)
    if args.child:
        measure(args.repeats)
        return
    load = os.getloadavg()
    print(f"B = {BATCH} float32 matrices, medians of {args.repeats} interleaved repeats (ms); "
          f"load average {load[0]:.2f} at the start")
    here = os.path.dirname(os.path.abspath(__file__))
    for threads in args.threads:
        print(f"\n{threads} thread(s):", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([here, *sys.path])}
        subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
                       env=env, check=True)


if __name__ == "__main__":
    main()
