"""The main demo: skpool's two pooling operators on scikit-learn's embedded digits data.
=====================================================================================

1. Generalized max pooling (Murray & Perronnin 2014) of local descriptor maps in a
   pipeline, against average and max pooling.
2. Separability pooling (Birodkar et al. 2019) of the raw 8x8 images, against average
   pooling, alpha and norm tuned by a grid search.

It says what it is doing as it goes: every step is announced before it runs, and every score
is printed as soon as it is known.

Run:  python examples/demo.py [--device cpu|cuda|auto]     (about half a minute on 2 CPU cores)
"""

import argparse
import os
import sys
import textwrap
import time

# The logistic regressions below are tiny (1797 x 32): BLAS threads only add synchronisation,
# which on a busy 2-core machine cost 3.5 s instead of 0.09 s per fit. torch keeps its threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import gmp_pipeline_digits  # noqa: E402
import separability_digits  # noqa: E402


def step(text: str) -> None:
    """Announce what comes next (before it runs, so a slow step is never silent)."""
    print(textwrap.fill(text, width=88, initial_indent="-> ", subsequent_indent="   "))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda'")
    device = parser.parse_args().device
    # One line at a time even into a pipe or a log file (Python buffers a pipe's output until
    # it has a few kilobytes, which would keep a long run silent to the end).
    sys.stdout.reconfigure(line_buffering=True)
    start = time.perf_counter()
    step("loading scikit-learn's digits (1797 images of 8x8 pixels, embedded: no download)")

    print("\n== 1. Generalized max pooling (Murray & Perronnin 2014) ==")
    step("turning each digit into an 8x8 map of 32 ReLU descriptors, then cross-validating "
         "three pipelines (average, max and generalized max pooling, then a logistic "
         "regression), 3 folds each; GMP's lambda is chosen by a grid search inside each fold")
    gmp_pipeline_digits.main(device)

    print("\n== 2. Separability pooling (Birodkar et al. 2019) ==")
    step("cross-validating average pooling and separability pooling of the 8x8 images "
         "(stride 2, 5 folds); in each fold a grid search over alpha (4 values) and the row "
         "norm (l1, l2) fits the operator 25 times (8 candidates x 3 folds, and the refit): "
         "the longest step")
    separability_digits.main(device)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
