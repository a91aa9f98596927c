"""Pictures of the learned pooling operators, saved as PNGs (about 5 s on a laptop CPU).
=====================================================================================

- ``operator.png``: the separability pooling operator learned on the digits (8x8 pixels, 10
  classes), drawn at every cell of its 4x4 output grid (Birodkar et al. 2019, Figure 1a): where
  each output cell takes its input from, with which sign; the cell centre is marked ``+``.
- ``gmp_weights_digits.png``: generalized max pooling weights of local descriptors of three
  digits, for λ from max-pooling-like (0.1) to sum-pooling-like (100).
- ``gmp_weights_bursty.png``: a striped image with one small blob: GMP gives the many
  repeated stripe descriptors small weights and the rare blob descriptors large ones, so the
  pooled vector is not dominated by the stripes (the "burstiness" GMP was designed for).

Run:  python examples/plots.py [--out DIR] [--alpha 10] [--device cpu|cuda|auto]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from gmp_pipeline_digits import local_descriptors  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from skpool import SeparabilityPooling  # noqa: E402
from skpool.plotting import plot_gmp_weights, plot_operator  # noqa: E402


def striped_image_with_blob(size=16):
    """A (size, size) image: vertical stripes everywhere, one small bright square."""
    image = np.zeros((size, size))
    image[:, ::4] = 1.0
    image[:, 1::4] = 1.0
    image[5:8, 9:12] = 0.5
    return image


def patch_descriptors(image, n_filters=16, seed=0):
    """(H, W) image -> (H, W, n_filters): ReLU of random filters on the 3x3 patch of each pixel."""
    filters = np.random.default_rng(seed).standard_normal((9, n_filters)) / 3.0
    padded = np.pad(image, 1, mode="wrap")
    patches = np.lib.stride_tricks.sliding_window_view(padded, (3, 3)).reshape(*image.shape, 9)
    return np.maximum(patches @ filters, 0.0)


def main(out="out", alpha=10.0, device="auto"):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    X, y = load_digits(return_X_y=True)
    pixels = X.reshape(-1, 8, 8, 1) / 16.0  # (n, H, W, C=1) maps

    pooling = SeparabilityPooling(alpha=alpha, stride=2, device=device).fit(pixels, y)
    fig = plot_operator(pooling, title=f"Separability pooling learned on digits (α = {alpha:g})")
    fig.savefig(out / "operator.png", dpi=110)
    plt.close(fig)

    descriptors = local_descriptors(X[:3])  # (3, 8, 8, 32)
    fig = plot_gmp_weights(X[:3].reshape(-1, 8, 8), descriptors, [0.1, 1.0, 10.0, 100.0])
    fig.savefig(out / "gmp_weights_digits.png", dpi=110)
    plt.close(fig)

    image = striped_image_with_blob()
    fig = plot_gmp_weights(
        image,
        patch_descriptors(image),
        [0.01, 1.0, 100.0],
        title="GMP weights: repeated stripes weigh little, the rare blob a lot",
    )
    fig.savefig(out / "gmp_weights_bursty.png", dpi=110)
    plt.close(fig)
    for name in ("operator.png", "gmp_weights_digits.png", "gmp_weights_bursty.png"):
        print(out / name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="directory for the PNGs (default: ./out)")
    parser.add_argument("--alpha", type=float, default=10.0, help="locality weight (default 10)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    main(args.out, args.alpha, args.device)
