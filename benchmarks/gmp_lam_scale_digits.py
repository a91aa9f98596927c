"""Which λ, absolute or relative, suits generalized max pooling by default: measured on digits.

Two measurements, both on scikit-learn's embedded digits (nothing downloaded):

1. ``layer``: a small CNN (:class:`skpool.models.PoolingCNN`, width 16, Adam at 1e-3, batches of
   64, 5 epochs by default) with a :class:`skpool.nn.GeneralizedMaxPool2d` head (learnable λ), for the
   papers' absolute λ (1e3, the old default, and 1) and relative λ (λ × each sample's mean
   squared descriptor norm) at 1e-2 … 10, and the average-pooling head for scale. 1 stage
   leaves a 4×4 grid of 32 channels, 2 stages a 2×2 grid of 64. Test accuracy on a stratified
   25% split (mean ± std over seeds) and the mean top predicted probability (the issue's sign
   of underfitting).
2. ``estimator``: :class:`skpool.GeneralizedMaxPooling` on fixed descriptors (the 3×3 patch
   around every pixel through a random projection and a ReLU, as in
   ``examples/gmp_pipeline_digits.py``) + standardisation + logistic regression, 3-fold CV
   accuracy for each λ.

Run:  python benchmarks/gmp_lam_scale_digits.py [--part layer|estimator|both] [--seeds 3]
      [--epochs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from skpool import GeneralizedMaxPooling
from skpool.models import PoolingCNN
from skpool.nn import GeneralizedMaxPool2d

HEADS = [
    ("avg", None, None),
    ("gmp", 1e3, "absolute"),
    ("gmp", 1.0, "absolute"),
    ("gmp", 1e-2, "relative"),
    ("gmp", 1e-1, "relative"),
    ("gmp", 1.0, "relative"),
    ("gmp", 10.0, "relative"),
]


def _train_and_score(images, labels, stages, head, seed, epochs=5):
    kind, lam, lam_scale = head
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, stratify=labels, random_state=0
    )
    torch.manual_seed(seed)
    model = PoolingCNN(width=16, n_stages=stages, global_pool="avg")
    if kind == "gmp":
        model.global_pool = GeneralizedMaxPool2d(lam=lam, lam_scale=lam_scale)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x_train), generator=generator).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        probabilities = model(torch.from_numpy(x_test)).softmax(dim=1).numpy()
    accuracy = float((probabilities.argmax(1) == y_test).mean())
    final_lam = float(model.global_pool.lam.detach()) if kind == "gmp" else float("nan")
    return accuracy, float(probabilities.max(1).mean()), final_lam


def layer_part(seeds, epochs):
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    print(f"layer: PoolingCNN width 16, Adam 1e-3, batch 64, {epochs} epochs, {seeds} seeds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for stages in (1, 2):
        grid = 8 // 2**stages
        print(f"  {stages} stage(s): {grid}x{grid} grid, {16 * 2**stages} channels")
        for head in HEADS:
            start = time.perf_counter()
            runs = [
                _train_and_score(images, labels, stages, head, seed, epochs)
                for seed in range(seeds)
            ]
            accuracy = [r[0] for r in runs]
            confidence = statistics.mean(r[1] for r in runs)
            lam = statistics.mean(r[2] for r in runs)
            name = "avg" if head[0] == "avg" else f"gmp {head[2]} lam={head[1]:g}"
            print(f"    {name:<26s} accuracy {statistics.mean(accuracy):.3f} ± "
                  f"{statistics.pstdev(accuracy):.3f}  top prob {confidence:.3f}  "
                  f"final lam {lam:.3g}  ({time.perf_counter() - start:.0f} s)")


_FILTERS = np.random.default_rng(0).standard_normal((9, 32)) / 3.0


def _local_descriptors(images):
    padded = np.pad(images.reshape(-1, 8, 8) / 16.0, ((0, 0), (1, 1), (1, 1)))
    patches = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
    patches = patches.reshape(len(images), 8, 8, 9)
    patches = patches - patches.mean(axis=-1, keepdims=True)
    return np.maximum(patches @ _FILTERS, 0.0).astype(np.float32)


def estimator_part():
    X, y = load_digits(return_X_y=True)
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    maps = _local_descriptors(X)
    mean_sq = float(np.mean(np.sum(maps.astype(np.float64) ** 2, axis=-1)))
    print(f"estimator: 8x8 maps of 32 ReLU descriptors (mean squared norm {mean_sq:.3g}), "
          "StandardScaler + LogisticRegression, 3-fold CV")
    settings = [(lam, "absolute") for lam in (1e-2, 1.0, 10.0, 100.0)]
    settings += [(lam, "relative") for lam in (1e-3, 1e-2, 1e-1, 1.0, 10.0)]
    for lam, lam_scale in settings:
        model = make_pipeline(
            GeneralizedMaxPooling(lam=lam, lam_scale=lam_scale, device="cpu"),
            StandardScaler(),
            LogisticRegression(max_iter=2000),
        )
        scores = cross_val_score(model, maps, y, cv=cv)
        print(f"  {lam_scale:<8s} lam={lam:<6g} accuracy {scores.mean():.3f} ± {scores.std():.3f}")
    average = make_pipeline(
        FunctionTransformer(lambda m: m.mean(axis=(1, 2))), StandardScaler(),
        LogisticRegression(max_iter=2000),
    )
    scores = cross_val_score(average, maps, y, cv=cv)
    print(f"  average pooling       accuracy {scores.mean():.3f} ± {scores.std():.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("layer", "estimator", "both"), default="both")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    if args.part in ("estimator", "both"):
        estimator_part()
    if args.part in ("layer", "both"):
        layer_part(args.seeds, args.epochs)


if __name__ == "__main__":
    main()
