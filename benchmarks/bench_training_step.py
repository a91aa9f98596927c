"""Cost of a pooling head in a training step of the deep model, against average pooling.

The Birodkar et al. CNN (width 64, three stride-2 stages) on 32x32 inputs (a 4x4 grid of 512
channels reaches the head), one optimiser step (forward, backward, Adam update) per call, with
the global pooling swapped: average (the reference), max, mixed, log-sum-exp, generalized max.
Target (issue 7): a GMP head costs at most 1.2x an average-pooling head per training step.

Run:  python benchmarks/bench_training_step.py [--quick] [--device cpu|cuda] [--batch 64]
"""

from __future__ import annotations

import argparse

import torch

from _timing import describe, median_time
from skpool import resolve_device
from skpool.models import PoolingCNN

HEADS = ["avg", "max", "mixed", "lse", "gmp"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="width 16, fewer repeats")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    device = resolve_device(args.device)
    width = 16 if args.quick else 64
    repeats = 5 if args.quick else 9
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    print(f"device: {describe(device)}; batch {args.batch}, {args.size}x{args.size}x3, width {width}")
    times = {}
    for head in HEADS:
        torch.manual_seed(0)
        model = PoolingCNN(in_channels=3, width=width, global_pool=head, lam=10.0).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()

        times[head] = median_time(step, device, repeats=repeats, warmup=2)
    print(f"{'head':<6} {'ms/step':>9} {'vs avg':>8}")
    for head, seconds in times.items():
        print(f"{head:<6} {1e3 * seconds:9.2f} {seconds / times['avg']:8.2f}x")


if __name__ == "__main__":
    main()
