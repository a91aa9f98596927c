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

from collections import namedtuple
from types import MappingProxyType

__all__ = [
    "SEPARABILITY_POOLING",
    "SEPARABILITY_POOLING_CHOICES",
    "GENERALIZED_MAX_POOLING",
    "GENERALIZED_MAX_POOLING_CHOICES",
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
