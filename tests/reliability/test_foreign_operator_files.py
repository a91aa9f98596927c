"""Issue 28, class 4: operator files with foreign dtypes. A big-endian file (written on or for
another machine) loads and works, converted to native byte order; an array of a float type
skpool cannot compute with (long double) is one OperatorFileError at load, never torch's
byte-order or dtype error at ``transform``."""

import numpy as np
import pytest

from skpool import SeparabilityPooling
from skpool.io import (
    OperatorFileError,
    estimator_from_arrays,
    load_operator,
    save_operator,
)

from .helpers import labelled_maps

MAPS, LABELS = labelled_maps(seed=5, n_samples=12, grid=(4, 4), n_channels=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("foreign") / "op.npz"
    pool = SeparabilityPooling(device="cpu").fit(MAPS, LABELS)
    save_operator(pool, path)
    return path, pool.transform(MAPS)


def _rewrite(path, target, convert):
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays = {name: convert(name, value) for name, value in arrays.items()}
    np.savez(target, **arrays)
    return target


def _big_endian(name, value):
    if value.dtype.kind in "fiuU" and value.dtype.byteorder != "|":
        return value.astype(value.dtype.newbyteorder(">"))
    return value


def test_big_endian_file_loads_and_transforms(saved, tmp_path):
    path, expected = saved
    foreign = _rewrite(path, tmp_path / "big.npz", _big_endian)
    with np.load(foreign) as archive:
        assert archive["operator"].dtype.byteorder == ">"  # the file really is big-endian
    fitted = load_operator(foreign)
    assert fitted.operator.dtype.isnative and fitted.channel_mean.dtype.isnative
    # the same values in another byte order: the same transform, bit for bit (same code)
    np.testing.assert_array_equal(estimator_from_arrays(fitted).transform(MAPS), expected)
    layer = fitted.to_module()
    assert layer.operator.dtype.is_floating_point


@pytest.mark.parametrize("name", ["operator", "channel_mean", "channel_scale", "eigenvalues"])
def test_long_double_array_is_refused_at_load(saved, tmp_path, name):
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("long double is float64 on this platform")
    path, _ = saved
    foreign = _rewrite(
        path, tmp_path / "long.npz",
        lambda key, value: value.astype(np.longdouble) if key == name else value,
    )
    with pytest.raises(OperatorFileError, match=f"{name}.*float"):
        load_operator(foreign)
    with pytest.raises(OperatorFileError):
        estimator_from_arrays(foreign)


def test_in_memory_operator_with_foreign_dtypes_is_checked_too(saved):
    path, expected = saved
    fitted = load_operator(path)
    from dataclasses import replace

    big = replace(fitted, operator=fitted.operator.astype(fitted.operator.dtype.newbyteorder(">")))
    np.testing.assert_array_equal(estimator_from_arrays(big).transform(MAPS), expected)
    if np.dtype(np.longdouble).itemsize > 8:
        long = replace(fitted, channel_scale=fitted.channel_scale.astype(np.longdouble))
        with pytest.raises(OperatorFileError, match="channel_scale"):
            estimator_from_arrays(long)
