"""Pick a floating-point environment that differs from this machine's native one, and prove it.

CI runs the numerical tests a second time single-threaded on a narrower instruction set, so
that a tolerance tuned to one machine's kernels fails here rather than on a user's machine.
The environment variables alone prove nothing (MKL ignores an ISA it cannot narrow to, and on
AMD processors it may already take a generic path), so this script fingerprints both
environments in subprocesses: ATen's dispatch level (``torch.backends.cpu.get_cpu_capability``)
and the exact bits of a float32 GEMM whose inner dimension spans several kernel blocks. A
different GEMM result means MKL ran different kernels (summation order, FMA use). If the
narrower ISA leaves MKL's bits unchanged, MKL_CBWR=COMPATIBLE (MKL's conditional numerical
reproducibility branch, a generic code path on every x86 processor) is added. Prints
``export NAME=value`` lines for bash's ``eval``; the evidence goes to stderr. Exits 1 when no
environment changes both ATen's level and MKL's bits.
"""

import json
import os
import subprocess
import sys

PROBE = r"""
import hashlib, json, torch
g = torch.Generator().manual_seed(0)
a = torch.randn(257, 1031, generator=g)
b = torch.randn(1031, 263, generator=g)
print(json.dumps({"aten": torch.backends.cpu.get_cpu_capability(),
                  "gemm": hashlib.sha1((a @ b).numpy().tobytes()).hexdigest()[:12]}))
"""
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def fingerprint(extra):
    env = {**os.environ, **SINGLE_THREAD, **extra}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    native = fingerprint({})
    if native["aten"].upper().startswith("AVX512"):  # an AVX-512 machine: run as AVX2 does
        candidate = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    else:  # AVX2 (or less): drop to ATen's generic kernels and MKL's SSE4.2 path
        candidate = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    narrow = fingerprint(candidate)
    if narrow["gemm"] == native["gemm"]:
        candidate["MKL_CBWR"] = "COMPATIBLE"
        narrow = fingerprint(candidate)
    print(f"native environment (1 thread): {native}", file=sys.stderr)
    print(f"second environment {candidate}: {narrow}", file=sys.stderr)
    if narrow["aten"] == native["aten"] or narrow["gemm"] == native["gemm"]:
        print("could not find an environment that changes both ATen's kernels and MKL's",
              file=sys.stderr)
        return 1
    for name, value in {**SINGLE_THREAD, **candidate}.items():
        print(f"export {name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
