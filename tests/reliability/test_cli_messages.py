"""Issue 28, class 8: command-line messages that say what and where. A NaN in sample 79 of 80
is reported as sample 79 (not relative to the batch being transformed); a --dtype that is no
number type (V0, U8, O) is a one-line error, not ZeroDivisionError; the estimators name the
first non-finite sample too."""

import numpy as np
import pytest

from skpool import GeneralizedMaxPooling
from skpool.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def maps_with_nan(tmp_path):
    maps = np.random.default_rng(0).normal(size=(80, 3, 3, 2)).astype(np.float32)
    maps[79, 1, 2, 0] = np.nan
    np.save(tmp_path / "X.npy", maps)
    maps.tofile(tmp_path / "X.f32")
    return tmp_path


@pytest.mark.parametrize("batch_size", ["7", "16", "256"])
@pytest.mark.parametrize("source", ["npy", "raw"])
def test_nan_sample_index_is_absolute(capsys, maps_with_nan, batch_size, source):
    tmp = maps_with_nan
    inputs = [tmp / "X.npy"] if source == "npy" else [tmp / "X.f32", "--shape", "3,3,2"]
    code, err = _run(capsys, "gmp", *inputs, "-o", tmp / "out.npy", "--batch-size", batch_size,
                     "--device", "cpu", "-q")
    assert code == 1 and err.count("\n") == 1, err
    assert "sample 79" in err and "NaN or infinity" in err, err
    assert "sample 0" not in err
    assert not (tmp / "out.npy").exists()


@pytest.mark.parametrize("dtype", ["V0", "V8", "U4", "O", "M8[s]", "c8"])
def test_non_numeric_raw_dtype_is_one_line(capsys, maps_with_nan, dtype):
    tmp = maps_with_nan
    code, err = _run(capsys, "gmp", tmp / "X.f32", "--shape", "3,3,2", "--dtype", dtype,
                     "-o", tmp / "out.npy", "--device", "cpu", "-q")
    assert code == 1 and err.count("\n") == 1, err
    assert "--dtype" in err and "traceback" not in err, err


def test_estimator_names_the_first_non_finite_sample():
    maps = np.random.default_rng(1).normal(size=(20, 4, 2))
    maps[13, 2, 1] = np.inf
    with pytest.raises(ValueError, match=r"sample 13 \(in the batch starting at sample 8\)"):
        GeneralizedMaxPooling(batch_size=8, device="cpu").fit(maps)
    ragged = [np.ones((3 + i % 4, 2)) for i in range(10)]
    ragged[6] = ragged[6].copy()
    ragged[6][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"sample 6\b"):
        GeneralizedMaxPooling(batch_size=4, device="cpu").fit(ragged)
