"""The estimators' parameters as plain data: their names in signature order, their defaults and
the values of those that take one of a few strings.

The one source of these facts. :class:`~skpool.SeparabilityPooling` and
:class:`~skpool.GeneralizedMaxPooling` take their defaults from here (``alpha=_DEFAULTS.alpha``
in their ``__init__``) and their string options (``_parameter_constraints``), and the command
line generates the options of ``skpool fit`` and ``skpool gmp`` from the same names, defaults
and choices (:mod:`skpool.cli._options`). ``tests/test_parameters.py`` holds each estimator's
signature to its record here (same names in the same order, every default read from the
record) and its docstring's ``default=`` to the same values; the command line refuses to build
its parser while a parameter has no option there, or no stated reason for having none.

Why a module of its own rather than reading ``inspect.signature`` of the estimators: their
modules import torch and scikit-learn, a few seconds that ``skpool --help``, usage errors and
``skpool info`` must not pay. This one imports the standard library only.

A new parameter: add it here (name and default, its choices if it takes one of a few strings),
to the estimator's signature as ``name=_DEFAULTS.name`` with its docstring and constraint, and
to :mod:`skpool.cli._options` as an option (or with the reason it is none).
"""

from __future__ import annotations

import math
from collections import namedtuple
from numbers import Integral, Real
from types import MappingProxyType

__all__ = [
    "SEPARABILITY_POOLING",
    "SEPARABILITY_POOLING_CHOICES",
    "GENERALIZED_MAX_POOLING",
    "GENERALIZED_MAX_POOLING_CHOICES",
    "MAX_COUNT",
    "MAX_MEMORY_MB",
    "MAX_SEED",
    "MAX_REFINE_STEPS",
    "check_integer",
    "check_real",
    "check_bool",
    "check_choice",
]


def _defaults(estimator: str, **defaults):
    """A read-only record of ``estimator``'s defaults in signature order: ``record.alpha``,
    ``record._fields`` (the names), ``record._asdict()``."""
    return namedtuple(f"{estimator}Defaults", defaults)(**defaults)


#: :class:`~skpool.SeparabilityPooling`'s parameters and defaults, in signature order.
SEPARABILITY_POOLING = _defaults(
    "SeparabilityPooling",
    alpha=1.0,
    stride=2,
    output_shape=None,
    n_components=1,
    norm="l2",
    normalize_channels=True,
    grid_shape=None,
    solver="auto",
    device="auto",
    dtype="auto",
    batch_size=256,
    max_memory_mb=None,
    support_radius=None,
    distributed=False,
    verbose=0,
    flatten=False,
)
#: Its string parameters' values, the default first (the order ``--help`` lists them in).
SEPARABILITY_POOLING_CHOICES = MappingProxyType(
    {
        "norm": ("l2", "l1"),
        "solver": ("auto", "low_rank", "full"),
        "dtype": ("auto", "float64", "float32"),
    }
)

#: :class:`~skpool.GeneralizedMaxPooling`'s parameters and defaults, in signature order.
GENERALIZED_MAX_POOLING = _defaults(
    "GeneralizedMaxPooling",
    lam=1.0,
    lam_scale="relative",
    normalize=True,
    device="auto",
    batch_size=256,
    grid_shape=None,
)
#: Its string parameters' values, the default first.
GENERALIZED_MAX_POOLING_CHOICES = MappingProxyType({"lam_scale": ("relative", "absolute")})


# ---------------------------------------------------------------------------------------------
# Bounds of numeric parameters, checked where a parameter is taken (layers, networks, helpers;
# the estimators declare the same bounds in ``_parameter_constraints``). Each error names the
# parameter; a value that passes never overflows later (issue 28, class 5).

#: Largest count, size, stride or batch any parameter takes: torch's 32-bit index kernels and
#: the C ``int`` of convolutions stop here, and nothing real comes near it.
MAX_COUNT = 2**31 - 1
#: Largest memory budget in MiB (1 EiB): its byte count stays an exact, finite integer.
MAX_MEMORY_MB = 2.0**40
#: Most fixed refinement steps of a GMP layer (``refine_steps=n``): each step multiplies the
#: error by about cond(G + lam) * eps32 where refinement works at all, so a few steps reach
#: float64's accuracy and more than this only spends time (a huge n would hang the layer).
MAX_REFINE_STEPS = 100
#: Largest integer seed (torch's and numpy's generators take 64-bit unsigned seeds).
MAX_SEED = 2**64 - 1


def check_integer(name: str, value, low: int = 1, high: int = MAX_COUNT) -> int:
    """``value`` as an int in ``[low, high]``; a TypeError or ValueError naming ``name``
    otherwise (a bool, a float such as 2.0, a string and None are not integers)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}.")
    return int(value)


def check_real(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    closed: str = "both",
) -> float:
    """``value`` as a finite float within ``low``/``high`` (``closed`` as in scikit-learn's
    ``Interval``: "both", "left", "right" or "neither"); a TypeError or ValueError naming
    ``name`` otherwise. Numbers, numpy scalars and one-element tensors are accepted; strings,
    None and bools are not."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    if not isinstance(value, Real):
        try:  # a 0-d numpy array or a one-element tensor
            value = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{name} must be a real number, got {type(value).__name__}."
            ) from None
    value = float(value)
    above = low is None or (value >= low if closed in ("both", "left") else value > low)
    below = high is None or (value <= high if closed in ("both", "right") else value < high)
    if not (math.isfinite(value) and above and below):
        raise ValueError(f"{name} must {_range_text(low, high, closed)}, got {value!r}.")
    return value


def _range_text(low, high, closed) -> str:
    """``"be a finite number > 0"``, ``"lie in (0, 1)"``: the words of :func:`check_real`."""
    left_closed, right_closed = closed in ("both", "left"), closed in ("both", "right")
    if low is not None and high is not None:
        left, right = "[" if left_closed else "(", "]" if right_closed else ")"
        return f"lie in {left}{low:g}, {high:g}{right}"
    if low is not None:
        return f"be a finite number {'>=' if left_closed else '>'} {low:g}"
    if high is not None:
        return f"be a finite number {'<=' if right_closed else '<'} {high:g}"
    return "be a finite number"


def check_bool(name: str, value) -> bool:
    """``value`` as a bool: True/False (or numpy's bools); anything else (None, 0/1, "no") is a
    TypeError naming ``name`` (truthiness would read "no" as True)."""
    kind = type(value)
    numpy_bool = kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")
    if isinstance(value, bool) or numpy_bool:
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of the strings ``choices``; a ValueError naming ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}.")
    return value
