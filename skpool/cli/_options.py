"""The estimators' parameters as command-line options, generated from :mod:`skpool._parameters`.

``skpool fit`` has one option per :class:`~skpool.SeparabilityPooling` parameter and ``skpool
gmp`` one per :class:`~skpool.GeneralizedMaxPooling` parameter. Which options there are, their
defaults (``%(default)s`` in the help) and their choices are the estimators' own: they come
from the plain-data module that the estimators' signatures take their defaults from, so the
command line cannot drift from the estimators and a new parameter reaches it without copying a
default. (The estimators' modules are not read: they import torch and scikit-learn, which
``--help`` must not wait for.) What only the command line knows is written here, per parameter:
the flag where it is not ``--<name>`` (``dtype`` is ``--precision``, ``--dtype`` being a raw
file's element type), the argparse type that checks a value before any file is read, the help
line and the group that lists it.

A parameter with no entry here gets no guessed option: :func:`estimator_options` raises, naming
it, so the parser is not built and the tests fail until it has an :class:`Option` or a
:class:`NotAnOption` stating why not. A guessed option would have no help and no check of its
value (a default of None does not even give a type), and some parameters must not be options
(``distributed``): each needs a decision, not a default.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _parameters
from .._grid import parse_grid

#: Titles of the option groups shared by gmp, fit and transform.
FEATURE_FILES, COMPUTATION = "feature files", "computation"


@dataclass(frozen=True)
class Option:
    """How one estimator parameter is given on the command line.

    ``help`` shows the default as ``%(default)s`` (the estimator's), or says in words what a
    default of None means. A boolean parameter is a flag that changes its default: ``flag`` is
    ``--no-<name>`` for one that defaults to True, ``--<name>`` for one that defaults to False
    (checked, so a changed default cannot leave a flag that says the opposite).
    """

    help: str
    flag: str | None = None  # default: --<name with dashes>
    dest: str | None = None  # attribute of the parsed arguments; default: the name
    type: Callable[[str], Any] | None = None  # None: the text (or one of the choices)
    metavar: str | None = None
    group: str | None = None  # FEATURE_FILES, COMPUTATION, or None: the estimator's group


@dataclass(frozen=True)
class NotAnOption:
    """An estimator parameter that the command line does not take, and why."""

    reason: str


# --------------------------------------------------------------------------------------------
# Argument types: a bad value is a usage error (exit 2) before any file is read
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def pair(text: str) -> tuple[int, int]:
    try:
        return parse_grid(text)
    except ValueError:
        message = f"expected two positive integers H,W, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


# --------------------------------------------------------------------------------------------
# The options of each estimator's parameters
_DEVICE = Option(
    "auto (CUDA when available), cpu, cuda or cuda:<index> (default: %(default)s)",
    group=COMPUTATION,
)
_BATCH_SIZE = Option(
    "samples per batch (bounds memory; default: %(default)s)",
    type=positive_int, metavar="B", group=COMPUTATION,
)
_GRID_SHAPE = Option(
    "spatial grid of (n, N, C) stacks (default: an N x 1 grid)",
    type=pair, metavar="H,W", group=FEATURE_FILES,
)

SEPARABILITY_POOLING = {
    "alpha": Option("locality weight >= 0 (default: %(default)s)", type=non_negative_float),
    "stride": Option("output grid ceil(H/s) x ceil(W/s) (default: %(default)s)",
                     type=positive_int),
    "output_shape": Option("output grid (overrides --stride)", type=pair, metavar="H',W'"),
    "n_components": Option("eigenvectors per output cell; K*C output channels (default: "
                           "%(default)s)", type=positive_int, metavar="K"),
    "norm": Option("norm of each operator row (default: %(default)s)"),
    "normalize_channels": Option("do not standardise the channels before fitting",
                                 flag="--no-normalize-channels"),
    "grid_shape": _GRID_SHAPE,
    "solver": Option("route of the eigenproblem (default: %(default)s)"),
    "device": _DEVICE,
    "dtype": Option("precision of the scatter and the solve, the estimator's dtype (--dtype is "
                    "the element type of a raw feature file); auto follows the features: "
                    "float32 for float32 files (default: %(default)s)",
                    flag="--precision", dest="precision"),
    "batch_size": _BATCH_SIZE,
    "max_memory_mb": Option("memory budget of the solve's work matrices in MiB (default: "
                            "from the device's free memory: half of a GPU's, at most 16 GiB; "
                            "a quarter of the host's, at most 1 GiB)",
                            type=positive_float, metavar="MB"),
    "support_radius": Option("solve each output cell over the input locations within R pixels "
                             "of its centre only (faster on large grids; default: exact)",
                             type=positive_float, metavar="R"),
    "distributed": NotAnOption("the command line runs one process"),
    "verbose": NotAnOption("progress bars follow -q/--quiet: shown on a terminal unless -q, "
                           "like gmp's and transform's"),
    "flatten": Option("transform writes (n, H'*W'*K*C) rows, one per sample, for a "
                      "classifier (default: (n, H', W', K*C) maps)"),
}

GENERALIZED_MAX_POOLING = {
    "lam": Option("ridge lambda > 0 (default: %(default)s); small values equalise the "
                  "descriptors like max pooling, large ones approach sum pooling",
                  type=positive_float),
    "lam_scale": Option("relative: lambda in units of each sample's mean squared descriptor "
                        "norm, trace(Phi^T Phi)/N, so the result does not depend on the "
                        "features' scale; absolute: the papers' lambda (default: %(default)s)"),
    "normalize": Option("do not l2-normalise the pooled vectors", flag="--no-normalize"),
    "device": _DEVICE,
    "batch_size": _BATCH_SIZE,
    "grid_shape": _GRID_SHAPE,
}

#: Estimator name -> (its defaults, its choices, its options).
ESTIMATORS = {
    "SeparabilityPooling": (
        _parameters.SEPARABILITY_POOLING,
        _parameters.SEPARABILITY_POOLING_CHOICES,
        SEPARABILITY_POOLING,
    ),
    "GeneralizedMaxPooling": (
        _parameters.GENERALIZED_MAX_POOLING,
        _parameters.GENERALIZED_MAX_POOLING_CHOICES,
        GENERALIZED_MAX_POOLING,
    ),
}


def estimator_options(estimator: str) -> list[tuple[str, Any, Option]]:
    """``(name, default, option)`` of each of ``estimator``'s parameters that is an option, in
    signature order.

    Raises
    ------
    LookupError
        Naming the parameters of the estimator without an entry in this module's table, and
        the entries that name no parameter of it.
    """
    defaults, _, options = ESTIMATORS[estimator]
    missing = [name for name in defaults._fields if name not in options]
    unknown = [name for name in options if name not in defaults._fields]
    if missing or unknown:
        raise LookupError(
            f"the command line's options do not match {estimator}'s parameters: "
            + "; ".join(
                [f"{name!r} has no Option or NotAnOption in skpool/cli/_options.py"
                 for name in missing]
                + [f"{name!r} has an entry but is no parameter of {estimator}"
                   for name in unknown]
            )
        )
    return [(name, default, options[name]) for name, default in defaults._asdict().items()
            if isinstance(options[name], Option)]


def add_estimator_options(groups: dict, estimator: str, *, own: bool = True) -> None:
    """Add an option for each of ``estimator``'s parameters to ``groups[option.group]`` (an
    argparse group per title; ``groups[None]`` the estimator's own group), with the estimator's
    default and choices. ``own=False`` adds only those of the shared groups (FEATURE_FILES,
    COMPUTATION), as ``transform`` does."""
    _, choices, _ = ESTIMATORS[estimator]
    for name, default, option in estimator_options(estimator):
        if option.group is None and not own:
            continue
        flag = option.flag or "--" + name.replace("_", "-")
        arguments = {"dest": option.dest or name, "help": option.help}
        if isinstance(default, bool):
            if flag.startswith("--no-") != default:
                raise ValueError(
                    f"{flag} cannot set {estimator}'s {name} (default {default}): a boolean "
                    f"is given as --no-<name> when it defaults to True, --<name> when False."
                )
            arguments["action"] = "store_false" if default else "store_true"
        else:
            arguments.update(default=default, type=option.type, metavar=option.metavar,
                             choices=choices.get(name))
        groups[option.group].add_argument(flag, **arguments)


def estimator_params(estimator: str, args: argparse.Namespace) -> dict:
    """``estimator``'s parameters from the parsed options: every one that is an option (the
    others keep the estimator's defaults)."""
    return {name: getattr(args, option.dest or name)
            for name, _, option in estimator_options(estimator)}
