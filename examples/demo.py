"""The main demo: skpool's two pooling operators on scikit-learn's embedded digits data.

1. Generalized max pooling (Murray & Perronnin 2014) of local descriptor maps in a
   pipeline, against average and max pooling.
2. Separability pooling (Birodkar et al. 2019) of the raw 8x8 images, against average
   pooling, alpha and norm tuned by a grid search.

Run:  python examples/demo.py [--device cpu|cuda|auto]     (about half a minute on 2 CPU cores)
"""

import argparse
import os

# The logistic regressions below are tiny (1797 x 32): BLAS threads only add synchronisation,
# which on a busy 2-core machine cost 3.5 s instead of 0.09 s per fit. torch keeps its threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import gmp_pipeline_digits  # noqa: E402
import separability_digits  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda'")
    device = parser.parse_args().device
    print("== 1. Generalized max pooling (Murray & Perronnin 2014) ==")
    gmp_pipeline_digits.main(device)
    print()
    print("== 2. Separability pooling (Birodkar et al. 2019) ==")
    separability_digits.main(device)
