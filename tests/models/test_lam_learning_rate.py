"""``lam_lr_factor``: one behaviour for DGMPClassifier and the embedders. λ = exp(θ)'s
parameters (``*log_lam``) learn at ``lr * lam_lr_factor``, the rest at ``lr``; set_params on a
fitted net keeps that; 0 freezes λ; a negative or non-finite factor is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from skpool.models import DGMPClassifier, DGMPEmbedder

EPS64 = np.finfo(np.float64).eps
TINY = {"module__width": 4, "module__n_stages": 2, "max_epochs": 1, "batch_size": 16,
        "random_state": 0, "device": "cpu"}
NETS = {
    "classifier": lambda **kw: DGMPClassifier(**TINY, lr=1e-3, **kw),
    "embedder": lambda **kw: DGMPEmbedder(**TINY, lr=1e-3, n_labels_per_batch=3, **kw),
}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.random((24, 8, 8), dtype=np.float32), np.arange(24) % 3


def lam_and_other_rates(net):
    """The learning rate of the log-λ parameter and the set of the others' rates."""
    lam = net.module_.global_pool.log_lam
    rates = {}
    for group in net.optimizer_.param_groups:
        for param in group["params"]:
            rates[id(param)] = group["lr"]
    return rates.pop(id(lam)), set(rates.values())


@pytest.mark.parametrize("kind", sorted(NETS))
def test_the_factor_scales_lambda_only_and_survives_set_params(kind, data):
    net = NETS[kind](lam_lr_factor=100.0).fit(*data)
    lam_rate, others = lam_and_other_rates(net)
    # lr x factor: one float64 product
    assert lam_rate == pytest.approx(1e-3 * 100, rel=EPS64) and others == {1e-3}
    net.set_params(lr=2e-3)  # skorch sets every group's lr; λ's keeps its factor
    lam_rate, others = lam_and_other_rates(net)
    assert lam_rate == pytest.approx(2e-3 * 100, rel=EPS64) and others == {2e-3}
    net.set_params(lam_lr_factor=10.0)
    lam_rate, others = lam_and_other_rates(net)
    assert lam_rate == pytest.approx(2e-3 * 10, rel=EPS64) and others == {2e-3}
    assert net.get_params()["lam_lr_factor"] == 10.0


@pytest.mark.parametrize("kind", sorted(NETS))
def test_a_zero_factor_freezes_lambda(kind, data):
    net = NETS[kind](lam_lr_factor=0.0, module__lam=3.0)
    net.initialize()
    before = float(net.module_.global_pool.log_lam.detach())
    net.partial_fit(*data)
    assert float(net.module_.global_pool.log_lam.detach()) == before  # a zero step: unchanged
    assert before == pytest.approx(math.log(3.0), rel=1e-6)  # float32 θ


@pytest.mark.parametrize("kind", sorted(NETS))
@pytest.mark.parametrize("factor", [-1.0, math.nan, math.inf])
def test_bad_factors_are_refused_alike(kind, factor):
    with pytest.raises(ValueError, match="lam_lr_factor must be a finite number >= 0"):
        NETS[kind](lam_lr_factor=factor).initialize()
