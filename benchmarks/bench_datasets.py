"""The SVHN-like data set and the corruptions: how long generating them takes.

Times (median of a few runs, after a warm-up):
- ``make_svhn_like``: 20,000 training + 5,000 test images, grey and colour;
- every corruption of :mod:`skpool.evaluation` at severity 3 on 5,000 colour test images;
- every perturbation sequence (CIFAR-10-P lengths) of 1,000 colour images, all frames.

Prints the machine (CPU model from ``lscpu``, torch threads, or the GPU) beside the times.
``--quick`` uses a tenth of the sizes (a few seconds).

Run:  python benchmarks/bench_datasets.py [--quick] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse

import torch

from _timing import describe, median_time
from skpool import resolve_device
from skpool.datasets import make_svhn_like
from skpool.evaluation import CORRUPTIONS, PERTURBATIONS, corrupt, perturbation_sequence


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    scale = 10 if args.quick else 1
    n_train, n_test, n_sequences = 20_000 // scale, 5_000 // scale, 1_000 // scale
    print(describe(device))

    for color in (False, True):
        seconds = median_time(
            lambda c=color: make_svhn_like(n_train, n_test, color=c, random_state=0),
            torch.device("cpu"), repeats=3, warmup=1,
        )
        kind = "colour" if color else "grey"
        print(f"make_svhn_like {n_train:,} + {n_test:,} {kind:>6}: {seconds:6.2f} s")

    images = torch.from_numpy(make_svhn_like(1, n_test, color=True, random_state=0).X_test)
    images = images.to(device)
    total = 0.0
    for name in CORRUPTIONS:
        seconds = median_time(lambda n=name: corrupt(images, n, 3, random_state=0), device, 3, 1)
        total += seconds
        print(f"corrupt {name:<15} severity 3, {n_test:,} images: {1e3 * seconds:8.1f} ms")
    print(f"all {len(CORRUPTIONS)} corruptions: {total:.2f} s")

    sequences = images[:n_sequences]
    total = 0.0
    for name in PERTURBATIONS:
        seconds = median_time(
            lambda n=name: perturbation_sequence(sequences, n, random_state=0), device, 3, 1
        )
        total += seconds
        print(f"sequence {name:<15} {n_sequences:,} images: {1e3 * seconds:8.1f} ms")
    print(f"all {len(PERTURBATIONS)} perturbation sequences: {total:.2f} s")


if __name__ == "__main__":
    main()
