"""The main demo: skpool's pooling operators on scikit-learn's embedded digits data.

Run:  python examples/demo.py [--device cpu|cuda|auto]
"""

import argparse

import gmp_pipeline_digits

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda'")
    device = parser.parse_args().device
    print("== Generalized max pooling (Murray & Perronnin 2014) ==")
    gmp_pipeline_digits.main(device)
