"""The ``skpool`` subcommands: ``gmp``, ``fit``, ``transform`` and ``info``. The estimators do
the pooling (imported by the commands that compute); these functions read, call and report."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from ._files import (
    MODEL_PICKLE_SUFFIXES,
    OUTPUT_SUFFIXES,
    check_exists,
    check_paths,
    load_model,
    read_features,
    transform_to_file,
)
from ._options import estimator_params


# --------------------------------------------------------------------------------------------
# Commands
def _run_gmp(args) -> int:
    check_paths(args, [args.features], OUTPUT_SUFFIXES)
    from .. import GeneralizedMaxPooling

    data = read_features(args)
    pooling = GeneralizedMaxPooling(**estimator_params("GeneralizedMaxPooling", args))
    start = time.perf_counter()
    shape = transform_to_file(pooling, data, args)
    _summary(args, f"GMP-pooled {_describe(data.features)} -> {shape} in "
             f"{time.perf_counter() - start:.1f} s: {args.output}")
    return 0


def _run_fit(args) -> int:
    kind = check_paths(args, [args.features, args.labels],
                        (".npz",) + MODEL_PICKLE_SUFFIXES)
    from .. import SeparabilityPooling
    from ..io import save_estimator, save_operator

    data = read_features(args, need_labels=True)
    pooling = SeparabilityPooling(**estimator_params("SeparabilityPooling", args))
    # progress bars like gmp's and transform's: on a terminal, unless -q
    pooling.set_params(verbose=int(not args.quiet and sys.stderr.isatty()))
    start = time.perf_counter()
    with warnings.catch_warnings():  # the note below says it for the command line
        warnings.filterwarnings("ignore", message=".*treated as a .*x1 grid", category=UserWarning)
        pooling.fit(data.features, data.labels)
    seconds = time.perf_counter() - start
    if kind == ".npz":
        save_operator(pooling, args.output)
    else:
        save_estimator(pooling, args.output)
    fitted = pooling.fitted_operator_
    (height, width), (out_h, out_w) = fitted.grid_shape, fitted.output_shape
    _summary(
        args,
        f"fitted SeparabilityPooling on {len(data.labels)} samples "
        f"({len(fitted.classes)} classes, {_plural(fitted.n_channels, 'channel')}) in "
        f"{seconds:.1f} s: {height}x{width} -> {out_h}x{out_w} grid, "
        f"{_plural(fitted.n_components, 'component')}; saved {args.output}",
    )
    note = _grid_note(fitted.grid_shape, data.features.ndim, args.grid_shape)
    if note:
        _summary(args, f"note: {note}")
    return 0


def _run_transform(args) -> int:
    check_paths(args, [args.model, args.features], OUTPUT_SUFFIXES)
    # The options override what the model was saved with (its device may not exist here).
    options = {"device": args.device, "batch_size": args.batch_size}
    if args.grid_shape is not None:
        options["grid_shape"] = args.grid_shape
    model = load_model(args.model, options=options)
    data = read_features(args)
    start = time.perf_counter()
    shape = transform_to_file(model, data, args)
    _summary(args, f"transformed {_describe(data.features)} -> {shape} in "
             f"{time.perf_counter() - start:.1f} s: {args.output}")
    return 0


def _run_info(args) -> int:
    check_exists(args.model)
    model = load_model(args.model, keep_arrays=True)
    description = _describe_model(model, args.model)
    if args.json:
        print(json.dumps(description, indent=2, default=str))
    else:
        width = max(len(key) for key in description)
        for key, value in description.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _summary(args, message: str) -> None:
    if not args.quiet:
        print(message)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _grid_note(grid, ndim: int | None, grid_shape) -> str:
    """A warning where a grid is N x 1 because no grid_shape was given (flattened (n, F) maps
    silently become F single-channel locations in a column); "" otherwise."""
    if grid_shape is not None or grid[1] != 1 or grid[0] == 1 or ndim == 4:
        return ""
    return (
        f"a {grid[0]}x1 grid, as 2-D (n, F) or 3-D (n, N, C) input without grid_shape gives; "
        "for flattened H x W maps refit with --grid-shape H,W"
    )


def _describe(features) -> str:
    return f"{features.shape[0]} samples of {'x'.join(map(str, features.shape[1:]))}"


def _describe_model(model, path: Path) -> dict:
    """What ``skpool info`` prints of a model: its fitted operator (an operator file's, or a
    pickled estimator's ``fitted_operator_``), or the repr of another estimator."""
    from .._fitted import FittedOperator

    if isinstance(model, FittedOperator):
        description = {"file": str(path), "kind": "SeparabilityPooling operator (.npz)",
                       "format_version": model.format_version}
        fitted = model
    elif hasattr(model, "operator_"):
        description = {"file": str(path), "kind": f"{type(model).__name__} (pickled)"}
        fitted = model.fitted_operator_
    else:
        return {"file": str(path), "kind": f"{type(model).__name__} (pickled)",
                "estimator": repr(model)}
    operator, grid, out = fitted.operator, fitted.grid_shape, fitted.output_shape
    channels, classes, eigenvalues = fitted.n_channels, fitted.classes, fitted.eigenvalues
    params = fitted.params
    n_components, n_out, n_in = operator.shape
    description.update(
        {
            "input_grid": f"{grid[0]}x{grid[1]} ({n_in} locations)",
            "output_grid": f"{out[0]}x{out[1]} ({n_out} cells)",
            "n_components": int(n_components),
            "channels": f"{channels} in -> {n_components * channels} out",
            "operator": f"{tuple(operator.shape)} {operator.dtype}",
        }
    )
    note = _grid_note(grid, None, params.get("grid_shape"))
    if note:
        description["note"] = note
    if classes is not None:
        shown = ", ".join(map(str, list(classes)[:10])) + (", ..." if len(classes) > 10 else "")
        description["classes"] = f"{len(classes)}: {shown}"
    if eigenvalues is not None and np.size(eigenvalues):
        values = np.asarray(eigenvalues)
        description["generalized_eigenvalues"] = (
            f"min {values.min():.4g}, median {np.median(values):.4g}, max {values.max():.4g} "
            "(p'Ap / p'(B + alpha C_m)p of each row on the training data, locality term "
            "included; not separability_ratios' p'Ap / p'Bp)"
        )
    description["params"] = ", ".join(f"{key}={value!r}" for key, value in params.items())
    return description


#: The handler of each subcommand.
COMMANDS = {
    "gmp": _run_gmp,
    "fit": _run_fit,
    "transform": _run_transform,
    "info": _run_info,
}
