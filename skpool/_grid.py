"""The one validator of a grid (H, W): the estimators' ``grid_shape`` and ``output_shape``,
the layers' grids, the plots', the operator files' and the command line's ``--grid-shape``.

Imports nothing beyond the standard library, so the command line checks grids without torch
or scikit-learn.
"""

from __future__ import annotations

__all__ = ["check_grid", "parse_grid"]


def check_grid(
    value, name: str = "grid_shape", *, n_locations: int | None = None, optional: bool = False
) -> tuple[int, int] | None:
    """``value`` as a grid (H, W) of two positive integers.

    Parameters
    ----------
    value : pair of int (integral floats and numpy integers accepted), or None
    name : str
        The parameter's name, for the message.
    n_locations : int, optional
        The number of locations H·W must equal (an operator's N or M).
    optional : bool
        Whether None is valid (returned as None).

    Raises
    ------
    ValueError
        Naming ``name``: not a pair of positive integers (strings, booleans, fractions, zero or
        negative sizes, three values...), or H·W differs from ``n_locations``.
    """
    if value is None and optional:
        return None
    try:
        if isinstance(value, (str, bytes)) or any(isinstance(v, bool) for v in value):
            raise TypeError
        height, width = (int(v) for v in value)
        valid = height >= 1 and width >= 1 and all(float(v) == int(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        valid = False
    if not valid:
        none = "None or " if optional else ""
        raise ValueError(
            f"{name} must be {none}a pair of positive integers (H, W), got {value!r}."
        )
    if n_locations is not None and height * width != n_locations:
        raise ValueError(
            f"{name} must be (rows, cols) with {n_locations} locations in all, got "
            f"{(height, width)} ({height * width} locations)."
        )
    return height, width


def parse_grid(text: str, name: str = "grid_shape") -> tuple[int, int]:
    """A grid written as ``"H,W"`` or ``"HxW"`` (the command line's form), checked by
    :func:`check_grid`."""
    try:
        values = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        values = text  # refused below, with the text in the message
    return check_grid(values, name)
