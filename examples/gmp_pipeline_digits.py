"""Generalized max pooling in a scikit-learn pipeline on the digits data.
======================================================================

Each 8x8 digit becomes a feature map of local descriptors (the 3x3 patch around every pixel,
passed through a fixed random projection and a ReLU, like the first layer of a CNN); the map is
pooled globally into one vector and a logistic regression classifies it. We compare average,
max and generalized max pooling (Murray & Perronnin 2014) with the same classifier, λ chosen
by a nested grid search.

Run:  python examples/gmp_pipeline_digits.py [--device cpu|cuda|auto]
"""

import argparse
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from skpool import GeneralizedMaxPooling

N_FILTERS = 32
_FILTERS = np.random.default_rng(0).standard_normal((9, N_FILTERS)) / 3.0


def local_descriptors(images):
    """(n, 64) digits -> (n, 8, 8, N_FILTERS) maps: ReLU of random filters on 3x3 patches."""
    padded = np.pad(images.reshape(-1, 8, 8) / 16.0, ((0, 0), (1, 1), (1, 1)))
    patches = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
    patches = patches.reshape(len(images), 8, 8, 9)
    patches = patches - patches.mean(axis=-1, keepdims=True)  # contrast, not brightness
    return np.maximum(patches @ _FILTERS, 0.0).astype(np.float32)


def global_pool(kind):
    reduce = {"average": np.mean, "max": np.max}[kind]
    return FunctionTransformer(lambda maps: reduce(maps, axis=(1, 2)))


def main(device="auto"):
    X, y = load_digits(return_X_y=True)
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    classifier = [StandardScaler(), LogisticRegression(max_iter=2000)]
    descriptors = FunctionTransformer(local_descriptors)
    candidates = {
        "average pooling": make_pipeline(descriptors, global_pool("average"), *classifier),
        "max pooling": make_pipeline(descriptors, global_pool("max"), *classifier),
        "generalized max pooling": GridSearchCV(
            make_pipeline(descriptors, GeneralizedMaxPooling(device=device), *classifier),
            {"generalizedmaxpooling__lam": [1.0, 10.0, 100.0]},
            cv=3,
        ),
    }
    print(f"digits: {len(X)} images, 8x8 maps of {N_FILTERS} ReLU descriptors, 3-fold CV")
    for name, model in candidates.items():
        start = time.perf_counter()
        scores = cross_val_score(model, X, y, cv=cv)
        print(
            f"  {name:<24s} accuracy {scores.mean():.3f} ± {scores.std():.3f}"
            f"   ({time.perf_counter() - start:.1f} s)"
        )
    search = candidates["generalized max pooling"].fit(X, y)
    print(f"  GMP lambda chosen on all data: {search.best_params_['generalizedmaxpooling__lam']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    main(parser.parse_args().device)
