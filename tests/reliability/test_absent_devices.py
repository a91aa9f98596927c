"""Issue 28, class 6: a device that this machine lacks (CUDA, MPS, XPU) is one clear ValueError
from :func:`skpool._device.resolve_device`, whichever face asks for it: the estimators, the
layers' constructors and ``.to``/``.cuda``, ``to_module(device=...)``, the networks and the
command line (one line on stderr)."""

import numpy as np
import pytest
import torch

from skpool import GeneralizedMaxPooling, SeparabilityPooling
from skpool._device import resolve_device
from skpool.cli import main
from skpool.models import PoolingCNN
from skpool.nn import (
    GeneralizedMaxPool2d,
    LogSumExpPool2d,
    MixedMaxAvgPool2d,
    SequenceGeneralizedMaxPool,
)

from .helpers import labelled_maps


def _absent(kind):
    if kind == "cuda":
        return not torch.cuda.is_available()
    if kind == "mps":
        return not torch.backends.mps.is_available()
    return not (hasattr(torch, "xpu") and torch.xpu.is_available())


ABSENT = [kind for kind in ("cuda", "mps", "xpu") if _absent(kind)]
if not ABSENT:  # pragma: no cover - a machine with all three
    pytest.skip("every accelerator is present here", allow_module_level=True)
MESSAGE = "not available on this machine"


@pytest.fixture(params=ABSENT)
def absent(request):
    return request.param


def test_resolve_device_names_the_missing_accelerator(absent):
    for spelling in (absent, f"{absent}:0", torch.device(absent)):
        with pytest.raises(ValueError, match=MESSAGE):
            resolve_device(spelling)


def test_estimators(absent):
    maps, labels = labelled_maps(n_samples=8)
    with pytest.raises(ValueError, match=MESSAGE):
        SeparabilityPooling(device=absent).fit(maps, labels)
    with pytest.raises(ValueError, match=MESSAGE):
        GeneralizedMaxPooling(device=absent).fit_transform(maps)


@pytest.mark.parametrize(
    "make", [GeneralizedMaxPool2d, MixedMaxAvgPool2d, LogSumExpPool2d, SequenceGeneralizedMaxPool]
)
def test_layers_constructor_and_moves(make, absent):
    with pytest.raises(ValueError, match=MESSAGE):
        make(device=absent)
    layer = make()
    for move in (lambda: layer.to(absent), lambda: layer.to(device=absent),
                 lambda: layer.to(torch.device(absent), torch.float64)):
        with pytest.raises(ValueError, match=MESSAGE):
            move()
    if absent in ("cuda", "xpu"):
        with pytest.raises(ValueError, match=MESSAGE):
            getattr(layer, absent)()
    assert layer.to(torch.float64).log_lam.dtype == torch.float64 if hasattr(
        layer, "log_lam"
    ) else True  # moves that name no device still work


def test_to_module_and_network_moves(absent):
    maps, labels = labelled_maps(n_samples=8, grid=(4, 4))
    fitted = SeparabilityPooling(device="cpu").fit(maps, labels).fitted_operator_
    with pytest.raises(ValueError, match=MESSAGE):
        fitted.to_module(device=absent)
    network = PoolingCNN(width=4, n_stages=1)
    with pytest.raises(ValueError, match=MESSAGE):
        network.to(absent)
    assert network.to("cpu") is network


def test_command_line_one_line(tmp_path, capsys, absent):
    maps, _ = labelled_maps(n_samples=4)
    np.save(tmp_path / "X.npy", maps)
    code = main(["gmp", str(tmp_path / "X.npy"), "-o", str(tmp_path / "o.npy"),
                 "--device", absent])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and MESSAGE in err, err
    assert "traceback" not in err
    assert not (tmp_path / "o.npy").exists()
