"""Robustness of pooling choices on SVHN-like digits: corruption error and flip rate.
==================================================================================

A miniature of Birodkar et al. (2019) Tables 2–3 with the metrics of Hendrycks & Dietterich
(2019), on :func:`skpool.datasets.make_svhn_like` (32×32 crops made from scikit-learn's digits;
nothing is downloaded). For each seed it trains

- the **baseline**: :class:`~skpool.models.PoolingCNNClassifier` whose three stages
  downsample with stride-2 convolutions (``strided``), and
- the **compared models**: by default the same CNN with 2×2 average pooling after each stage
  (``avg``); ``--models strided,avg,max,separability`` adds max pooling and Birodkar et al.'s
  learned separability pooling at the first stage (``SeparabilityPoolingClassifier``, α = 1),

all with the same data, seed, width and epochs, and measures on the test images:

1. the clean test error;
2. **E_{s,c}**, the test error under each corruption c of :mod:`skpool.evaluation` at severities
   s = 1..5 (geometric: translate, rotate, scale, shear, tilt, zoom blur; non-geometric:
   Gaussian and shot noise, Gaussian blur, brightness, contrast, pixelate, quantize), and each
   compared model's **corruption error** CE_c = Σ_s E_{s,c}(model) / Σ_s E_{s,c}(baseline), with
   mCE = 100 × the mean of CE_c over the geometric and over the non-geometric corruptions
   (below 100: fewer errors under corruption than the strided baseline);
3. **FP_p**, the flip probability over perturbation sequences p (CIFAR-10-P sweeps of the first
   ``--sequences`` test images: the fraction of consecutive frames whose predicted label
   differs; for noise sequences, of frames whose label differs from the clean first frame),
   and the **flip rate** FR_p = FP_p(model) / FP_p(baseline) with mFR = 100 × its mean over
   geometric and over non-geometric perturbations (below 100: more stable predictions).

It prints mean ± std over seeds (the data set is the same for every seed; the networks'
initialisation, batch order and the corruptions' random draws change) and writes every raw
number to ``--out`` (JSON) with the settings, the machine and the run time. What it does not
do: tune α or the norm by cross-validation, run ResNet-18 or the SGD-learned pooling (the
paper's other rows); it reports whatever comes out, including "n/a" where a baseline makes no
error or never flips (the ratio is then undefined).

Quick (the default, one seed, minutes on a laptop CPU):
    python examples/robustness_digits.py
Five seeds, the full-size set (an hour or more on a CPU; use --device cuda where there is one):
    python examples/robustness_digits.py --full
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from skpool import describe_device
from skpool.datasets import make_svhn_like
from skpool.evaluation import (
    GEOMETRIC_CORRUPTIONS,
    GEOMETRIC_PERTURBATIONS,
    NON_GEOMETRIC_CORRUPTIONS,
    NON_GEOMETRIC_PERTURBATIONS,
    PERTURBATIONS,
    corruption_error,
    evaluate_corruptions,
    evaluate_perturbations,
    flip_rate,
)
from skpool.models import PoolingCNNClassifier, SeparabilityPoolingClassifier

QUICK = {"seeds": 1, "train_size": 3000, "test_size": 500, "sequences": 200, "epochs": 10,
         "width": 12}
FULL = {"seeds": 5, "train_size": 20000, "test_size": 5000, "sequences": 1000, "epochs": 15,
        "width": 16}


def build(name: str, seed: int, args, in_channels: int):
    common = {
        "module__width": args.width,
        "module__in_channels": in_channels,
        "max_epochs": args.epochs,
        "random_state": seed,
        "device": args.device,
    }
    if name == "separability":
        return SeparabilityPoolingClassifier(stage=0, alpha=1.0, **common)
    return PoolingCNNClassifier(module__stage_pooling=name, **common)


def measure(model, data, args, seed) -> dict:
    X_test, y_test = data.X_test, data.y_test
    sequences = X_test[: args.sequences]
    errors = evaluate_corruptions(model, X_test, y_test, random_state=seed)
    flips = evaluate_perturbations(model, sequences, n_frames=args.frames, random_state=seed)
    return {
        "clean_error": float(np.mean(model.predict(X_test) != y_test)),
        "errors": {name: values.tolist() for name, values in errors.items()},
        "flip_probability": flips,
    }


def ratios(result: dict, baseline: dict) -> dict:
    """CE per corruption and FR per perturbation of one model against the baseline (None: n/a)."""
    ce, fr = {}, {}
    for name, values in result["errors"].items():
        try:
            ce[name] = corruption_error(values, baseline["errors"][name])
        except ValueError:  # the baseline made no error at all
            ce[name] = None
    for name, value in result["flip_probability"].items():
        try:
            fr[name] = flip_rate(value, baseline["flip_probability"][name])
        except ValueError:  # the baseline never flipped
            fr[name] = None
    return {"CE": ce, "FR": fr}


def mean_std(values, scale=1.0) -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def group_mean(per_name: dict, names) -> float | None:
    values = [per_name[n] for n in names if per_name.get(n) is not None]
    return float(np.mean(values)) if values else None  # CE and FR are in percent


def report(runs: list[dict], models: list[str]) -> None:
    print(f"\nClean test error (%), {len(runs)} seed(s):")
    print("| model | error |\n| --- | --- |")
    for name in models:
        print(f"| {name} | {mean_std([r['results'][name]['clean_error'] for r in runs], 100)} |")
    print(f"\nCorruptions: mean error over severities 1-5 (%) and CE vs {models[0]}:")
    table(runs, models, "corruption", ("E", "CE", "mCE"),
          lambda result, name: np.mean(result["errors"][name]),
          (("geometric", GEOMETRIC_CORRUPTIONS), ("non-geometric", NON_GEOMETRIC_CORRUPTIONS)))
    print(f"\nPerturbations: flip probability (%) and FR vs {models[0]}:")
    table(runs, models, "perturbation", ("FP", "FR", "mFR"),
          lambda result, name: result["flip_probability"][name],
          (("geometric", GEOMETRIC_PERTURBATIONS), ("non-geometric", NON_GEOMETRIC_PERTURBATIONS)))


def table(runs, models, what, labels, value, groups) -> None:
    """Rows: each name's value per model (%) and CE or FR (%) per compared model; then group
    means."""
    value_label, ratio_label, mean_label = labels
    compared = models[1:]
    header = [f"{value_label} {m}" for m in models] + [f"{ratio_label} {m}" for m in compared]
    print(f"| {what} | {' | '.join(header)} |\n|{' --- |' * (1 + len(header))}")
    for _, names in groups:
        for name in names:
            cells = [mean_std([value(r["results"][m], name) for r in runs], 100) for m in models]
            cells += [mean_std([r["ratios"][m][ratio_label][name] for r in runs]) for m in compared]
            print(f"| {name} | {' | '.join(cells)} |")
    for group, names in groups:
        cells = [
            mean_std([group_mean(r["ratios"][m][ratio_label], names) for r in runs])
            for m in compared
        ]
        print(f"| **{mean_label} {group}** |{' |' * len(models)} {' | '.join(cells)} |")


def machine() -> str:
    """The CPU (model, ATen SIMD level, threads), the GPU if any, and torch's version."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{describe_device('cpu')}; {gpu}; torch {torch.__version__}"


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help=f"the full sizes: {FULL}")
    parser.add_argument("--seeds", type=int, help="number of seeds (quick: 1, --full: 5)")
    parser.add_argument("--train-size", type=int, help="training images of the full set")
    parser.add_argument("--test-size", type=int)
    parser.add_argument("--sequences", type=int, help="test images that start a sequence")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--width", type=int, help="stem channels of the CNN (the paper: 64)")
    parser.add_argument("--frames", type=int, help="frames per sequence (CIFAR-10-P's)")
    parser.add_argument("--reduced", action="store_true", help="train on 5%% of the training set")
    parser.add_argument("--color", action="store_true", help="3-channel images")
    parser.add_argument("--models", default="strided,avg", help="first is the baseline")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="robustness_digits.json", help="raw results (JSON)")
    args = parser.parse_args(argv)
    for key, value in (FULL if args.full else QUICK).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    known = {"strided", "avg", "max", "separability"}
    if len(args.models) < 2 or not set(args.models) <= known or args.models[0] == "separability":
        parser.error(
            f"--models: a baseline and at least one more of {sorted(known)} "
            "(the baseline cannot be 'separability')"
        )
    return args


def main(argv=None):
    args = parse(argv)
    start = time.perf_counter()
    data = make_svhn_like(
        args.train_size, args.test_size, reduced=args.reduced, color=args.color, random_state=0
    )
    in_channels = data.X_train.shape[1]
    print(
        f"SVHN-like: {len(data.X_train):,} training / {len(data.X_test):,} test images "
        f"({'colour' if args.color else 'grey'}{', reduced' if args.reduced else ''}); width "
        f"{args.width}, {args.epochs} epochs, {args.seeds} seed(s); {machine()}",
        flush=True,
    )
    runs = []
    for seed in range(args.seeds):
        results = {}
        for name in args.models:
            began = time.perf_counter()
            model = build(name, seed, args, in_channels).fit(data.X_train, data.y_train)
            results[name] = measure(model, data, args, seed)
            print(
                f"seed {seed} {name}: clean error {100 * results[name]['clean_error']:.1f}% "
                f"({time.perf_counter() - began:.0f} s)",
                file=sys.stderr, flush=True,
            )
        baseline = results[args.models[0]]
        runs.append({
            "seed": seed,
            "results": results,
            "ratios": {m: ratios(results[m], baseline) for m in args.models[1:]},
        })
    elapsed = time.perf_counter() - start
    report(runs, args.models)
    print(f"\n{elapsed:.0f} s in all; raw results in {args.out}")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    record = {"settings": settings, "machine": machine(), "seconds": elapsed, "runs": runs}
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")  # a failed write leaves no half file
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, out)


if __name__ == "__main__":
    main()
