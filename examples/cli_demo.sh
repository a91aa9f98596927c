#!/usr/bin/env bash
# The skpool command line on the digits data (about 30 s on a laptop CPU, mostly start-up).
#
# Builds feature files from scikit-learn's digits, fits a separability pooling operator with
# `skpool fit`, pools train and test maps with `skpool transform`, GMP-pools a raw float32
# memmap with `skpool gmp`, and classifies the pooled features.
#
# Run:  bash examples/cli_demo.sh [WORKDIR]     (default: a new temporary directory)
set -euo pipefail

examples="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
cd "$work"
echo "== working in $work"

echo "== 1. feature files"
python - "$examples" <<'EOF'
import sys

import numpy as np
from sklearn.datasets import load_digits

sys.path.insert(0, sys.argv[1])
from gmp_pipeline_digits import local_descriptors  # noqa: E402

X, y = load_digits(return_X_y=True)
maps = (X.reshape(-1, 8, 8, 1) / 16.0).astype(np.float32)  # (n, H, W, C) pixel maps
np.savez("train.npz", X=maps[:1200], y=y[:1200])             # named arrays X and y
np.savez("test.npz", X=maps[1200:], y=y[1200:])
local_descriptors(X).tofile("descriptors.f32")               # raw (1797, 8, 8, 32) float32
np.save("labels.npy", y)
print("train.npz test.npz: (n, 8, 8, 1) digits; descriptors.f32: raw (1797, 8, 8, 32)")
EOF

echo "== 2. skpool fit / info / transform"
skpool fit train.npz -o model.npz --alpha 10 --stride 2 --device auto
skpool info model.npz
skpool transform model.npz train.npz -o train_pooled.npz
skpool transform model.npz test.npz -o test_pooled.npz

echo "== 3. skpool gmp on a raw memmap (the sample count follows from the file size)"
skpool gmp descriptors.f32 --shape 8,8,32 --dtype float32 --lam 100 -o gmp.npy

echo "== 4. use the pooled features"
python - <<'EOF'
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def accuracy(train_X, test_X):
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    classifier.fit(train_X.reshape(len(train_X), -1), train["y"])
    return classifier.score(test_X.reshape(len(test_X), -1), test["y"])


def average_2x2(maps):  # the fixed pooling the learned operator replaces
    return maps.reshape(len(maps), 4, 2, 4, 2, -1).mean(axis=(2, 4))


train, test = np.load("train_pooled.npz"), np.load("test_pooled.npz")
raw_train, raw_test = np.load("train.npz")["X"], np.load("test.npz")["X"]
print(f"4x4 maps, test accuracy: separability pooling {accuracy(train['X'], test['X']):.3f}, "
      f"2x2 average pooling {accuracy(average_2x2(raw_train), average_2x2(raw_test)):.3f}")

pooled, labels = np.load("gmp.npy"), np.load("labels.npy")
classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
scores = cross_val_score(classifier, pooled, labels, cv=3)
print(f"GMP-pooled descriptors (1797, 32), 3-fold CV accuracy {scores.mean():.3f}")
EOF
