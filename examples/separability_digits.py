"""Separability pooling (Birodkar et al. 2019) in a scikit-learn pipeline on the digits data.
==========================================================================================

Each raw 8x8 digit is a 1-channel feature map. Both pipelines pool it with stride 2 to a 4x4
map (16 values) and classify that with the same scaled logistic regression; they differ only in
the pooling:

- average pooling: every output value is the mean of its 2x2 block;
- separability pooling: every output value is a learned linear combination of the pixels around
  its block's centre, chosen in closed form to separate the classes best (alpha, the locality
  weight, and the norm of the rows are tuned by an inner grid search).

The scores are 5-fold cross-validated accuracies (the grid search runs inside each fold).
Below the scores, the separability ratio p'Ap / p'Bp of each output cell (between- over
within-class scatter of the pooled value, on all the data) for both operators.

Run:  python examples/separability_digits.py [--device cpu|cuda|auto]   (about 10 s on 2 CPU cores)
"""

import argparse
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from skpool import SeparabilityPooling

STRIDE = 2


def as_maps(images):
    """(n, 64) digits -> (n, 8, 8, 1) one-channel feature maps."""
    return images.reshape(-1, 8, 8, 1)


def average_pool(maps):
    """(n, 8, 8, 1) -> (n, 16): the mean of every STRIDE x STRIDE block."""
    n, height, width, _ = maps.shape
    blocks = maps.reshape(n, height // STRIDE, STRIDE, width // STRIDE, STRIDE)
    return blocks.mean(axis=(2, 4)).reshape(n, -1)


def flatten(maps):
    return maps.reshape(len(maps), -1)


def classifier():
    return [StandardScaler(), LogisticRegression(max_iter=2000)]


def main(device="auto"):
    X, y = load_digits(return_X_y=True)
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    separability = make_pipeline(
        FunctionTransformer(as_maps),
        SeparabilityPooling(stride=STRIDE, device=device),
        FunctionTransformer(flatten),
        *classifier(),
    )
    candidates = {
        "average pooling": make_pipeline(
            FunctionTransformer(as_maps), FunctionTransformer(average_pool), *classifier()
        ),
        "separability pooling": GridSearchCV(
            separability,
            {
                "separabilitypooling__alpha": [0.01, 0.1, 1.0, 10.0],
                "separabilitypooling__norm": ["l1", "l2"],
            },
            cv=3,
        ),
    }
    print(f"digits: {len(X)} images as 8x8x1 maps, stride {STRIDE} -> 4x4, 5-fold CV accuracy")
    for name, model in candidates.items():
        start = time.perf_counter()
        scores = cross_val_score(model, X, y, cv=cv)
        print(
            f"  {name:<22s} {scores.mean():.3f} ± {scores.std():.3f}"
            f"   ({time.perf_counter() - start:.1f} s)"
        )

    search = candidates["separability pooling"].fit(X, y)
    params = {key.split("__")[1]: value for key, value in search.best_params_.items()}
    print(f"  chosen on all data: {params}")
    pooling = search.best_estimator_.named_steps["separabilitypooling"]
    ratios = pooling.separability_ratios(as_maps(X), y)
    print("separability ratio p'Ap / p'Bp per output cell (4x4), on all the data:")
    with np.printoptions(precision=3, suppress=True):
        print("  learned operator:\n", ratios.learned[0].reshape(ratios.output_shape))
        print("  average pooling:\n", ratios.average.reshape(ratios.output_shape))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda'"
    )
    main(parser.parse_args().device)
