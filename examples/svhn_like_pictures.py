"""Pictures of the SVHN-like data set and of the corruptions, saved as small PNGs (a few seconds).
===============================================================================================

- ``svhn_like.png``: training images of :func:`skpool.datasets.make_svhn_like`, grey and in
  colour, each titled with its label (the centre digit); the partial digits at the edges are
  the distractors.
- ``corruptions.png``: one test image under each corruption of :mod:`skpool.evaluation` at
  severities 1, 3 and 5 (Hendrycks & Dietterich 2019).

Run:  python examples/svhn_like_pictures.py [--out docs]
"""

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no window

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402 (a dependency of matplotlib)

from skpool.datasets import make_svhn_like  # noqa: E402
from skpool.evaluation import CORRUPTIONS, corrupt  # noqa: E402


def _show(axis, image, title=None):
    """Draw one (C, 32, 32) image in [0, 1] without axes."""
    if image.shape[0] == 1:
        axis.imshow(image[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        axis.imshow(image.transpose(1, 2, 0), interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    if title is not None:
        axis.set_title(title, fontsize=8, pad=2)


def dataset_figure(n_columns=10):
    grey = make_svhn_like(n_columns, 0, random_state=0)
    colour = make_svhn_like(n_columns, 0, color=True, random_state=1)
    fig, axes = plt.subplots(2, n_columns, figsize=(n_columns * 0.75, 1.85))
    for row, data in enumerate((grey, colour)):
        for axis, image, label in zip(axes[row], data.X_train, data.y_train, strict=True):
            _show(axis, image, str(label))
    fig.suptitle(
        "make_svhn_like: grey (top) and color=True (bottom); titles are the labels", fontsize=8
    )
    fig.subplots_adjust(left=0.01, right=0.99, top=0.8, bottom=0.02, wspace=0.08, hspace=0.35)
    return fig


def corruptions_figure(severities=(1, 3, 5)):
    image = make_svhn_like(1, 1, color=True, random_state=2).X_test
    fig, axes = plt.subplots(
        len(severities), len(CORRUPTIONS) + 1, figsize=((len(CORRUPTIONS) + 1) * 0.7, 2.3)
    )
    for row, severity in enumerate(severities):
        _show(axes[row, 0], image[0], "clean" if row == 0 else None)
        axes[row, 0].set_ylabel(f"severity {severity}", fontsize=7)
        for column, name in enumerate(CORRUPTIONS, start=1):
            corrupted = corrupt(image, name, severity, random_state=0)[0]
            _show(axes[row, column], corrupted, name.replace("_", "\n") if row == 0 else None)
    fig.subplots_adjust(left=0.03, right=0.995, top=0.8, bottom=0.01, wspace=0.06, hspace=0.06)
    for title in (a.title for a in axes[0]):
        title.set_fontsize(6)
    return fig


def save_small(fig, path, dpi=90, colors=128):
    """Save a figure as a palette PNG (a third of the size of a full-colour one)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    image = Image.open(buffer).convert("RGB")
    image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(out="docs"):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"svhn_like.png": dataset_figure(), "corruptions.png": corruptions_figure()}
    for name, fig in figures.items():
        save_small(fig, out / name)
        print(f"saved {out / name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs", help="folder for the PNGs (default: docs)")
    main(parser.parse_args().out)
