"""DGMP for retrieval: the batch-hard triplet loss, the P x K sampler, the embedding estimator,
and the retrieval metrics (mAP, top-1) used as GridSearchCV scorers."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.metrics import average_precision_score
from sklearn.model_selection import GridSearchCV, train_test_split
from skorch.dataset import ValidSplit

import skpool.evaluation.retrieval as retrieval_metrics
from skpool.models.retrieval import (
    DGMPEmbedder,
    HardBatchTripletLoss,
    PKBatchSampler,
    PoolingEmbedder,
    PoolingEmbeddingNet,
)
from skpool.nn import GeneralizedMaxPool2d
from skpool.evaluation import (
    average_precision_per_query,
    mean_average_precision,
    mean_average_precision_scorer,
    top1_accuracy,
    top1_accuracy_scorer,
)
from testing_utils import requires_cuda

TINY = {"module__width": 4, "module__n_stages": 2, "random_state": 0}


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).reshape(-1, 8, 8).astype(np.float32)
    return train_test_split(X, y, train_size=500, random_state=0, stratify=y)


# --------------------------------------------------------------------------- the loss


def reference_triplet_loss(embeddings, labels, margin):
    """Slow batch-hard triplet loss: a loop over anchors, distances one pair at a time.

    Works on float64 numpy arrays and on float64 torch tensors (then differentiable)."""
    norm = torch.linalg.vector_norm if isinstance(embeddings, torch.Tensor) else np.linalg.norm
    terms = []
    for a in range(len(labels)):
        positives = [
            norm(embeddings[a] - embeddings[p])
            for p in range(len(labels))
            if p != a and labels[p] == labels[a]
        ]
        negatives = [
            norm(embeddings[a] - embeddings[n])
            for n in range(len(labels))
            if labels[n] != labels[a]
        ]
        if positives and negatives:
            hardest_positive = positives[int(np.argmax([_value(d) for d in positives]))]
            hardest_negative = negatives[int(np.argmin([_value(d) for d in negatives]))]
            term = margin + hardest_positive - hardest_negative
            terms.append(term if term > 0 else term * 0)
    return sum(terms) / len(terms)


def _value(distance):
    return float(distance.detach()) if isinstance(distance, torch.Tensor) else float(distance)


EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
#: Hand-computed rational metrics: a few roundings on each side (a division per precision,
#: a sum of two, a mean of three; Python's own fraction rounded once), at most 8 eps.
RATIONAL_RTOL = 8 * EPS64


def triplet_loss_bound(n_anchors, dim, margin, unit):
    """Rounding bound of one computation of the batch-hard triplet loss of unit vectors in a
    precision of machine epsilon ``unit``: each distance |a - b| (differences, a dim-term
    sum of squares, a square root) errs by (dim + 3) eps |(|a| + |b|)| <= 2 (dim + 3) eps;
    a hinge term m + d_p - d_n adds two roundings of magnitude <= m + 4; the mean over the
    anchors n_anchors more. A mining choice that rounding flips picks a distance equal to the
    other within that same bound, so it changes nothing beyond it."""
    return (4 * (dim + 3) + (n_anchors + 2) * (margin + 4)) * unit


def random_batch(rng, n_labels=4, per_label=3, dim=5, singletons=2):
    labels = np.concatenate(
        [np.repeat(np.arange(n_labels), per_label), n_labels + np.arange(singletons)]
    )
    rng.shuffle(labels)
    embeddings = rng.standard_normal((len(labels), dim))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings, labels


@pytest.mark.parametrize("margin", [0.0, 0.2, 1.0, 3.0])
def test_loss_matches_the_slow_reference(rng, margin):
    embeddings, labels = random_batch(rng)
    loss = HardBatchTripletLoss(margin)(torch.from_numpy(embeddings), torch.from_numpy(labels))
    expected = reference_triplet_loss(embeddings, labels, margin)
    # two float64 computations (skpool's and the reference), each within the loss's bound
    anchors, dim = len(labels), embeddings.shape[1]
    bound64 = triplet_loss_bound(anchors, dim, margin, EPS64)
    assert float(loss) == pytest.approx(float(expected), rel=0, abs=2 * bound64)
    loss32 = HardBatchTripletLoss(margin)(
        torch.from_numpy(embeddings).float(), torch.from_numpy(labels)
    )
    # float32: its own bound, plus the embeddings' rounding to float32 (u32 per entry: each
    # distance moves by <= eps32, each hinge term by <= 2 eps32), plus the reference's
    bound32 = triplet_loss_bound(anchors, dim, margin, EPS32) + 2 * EPS32 + bound64
    assert float(loss32) == pytest.approx(float(expected), rel=0, abs=bound32)


def test_loss_by_hand():
    # 1-D embeddings 0, 1 (label 0) and 3, 5 (label 1), margin 2.5: anchors' hardest
    # (positive, negative) distances are (1, 3), (1, 2), (2, 2), (2, 4), hinge terms
    # 0.5, 1.5, 2.5, 0.5, mean 1.25.
    embeddings = torch.tensor([[0.0], [1.0], [3.0], [5.0]], dtype=torch.float64)
    loss = HardBatchTripletLoss(2.5)(embeddings, torch.tensor([0, 0, 1, 1]))
    assert float(loss) == 1.25  # exact: every distance, term and the mean are dyadic


def test_loss_gradients(rng):
    embeddings, labels = random_batch(rng)
    labels = torch.from_numpy(labels)
    x = torch.from_numpy(embeddings).requires_grad_(True)
    loss_fn = HardBatchTripletLoss(0.5)
    assert torch.autograd.gradcheck(lambda e: loss_fn(e, labels), (x,))
    # The same gradient as the slow reference differentiated by autograd.
    (grad,) = torch.autograd.grad(loss_fn(x, labels), x)
    (expected,) = torch.autograd.grad(reference_triplet_loss(x, labels.tolist(), 0.5), x)
    # Each term contributes +-(a - b) / |a - b| / T (entries <= 1 / T, relative error
    # (dim + 4) eps: the difference, the norm, the division); an embedding gets at most 2 T
    # contributions (anchor of 2 terms, positive or negative of the others), summed with
    # 2 T roundings. Two float64 computations.
    # The contributions' sizes add up to at most 2 T / T = 2.
    anchors, dim = len(labels), embeddings.shape[1]
    bound = 2 * (dim + 4 + 2 * anchors) * EPS64 * 2
    torch.testing.assert_close(grad, expected, rtol=0, atol=bound)


def test_loss_without_valid_anchors_and_with_coinciding_embeddings():
    x = torch.randn(4, 3, requires_grad=True)
    for labels in ([7, 7, 7, 7], [0, 1, 2, 3]):  # no negative / no positive anywhere
        loss = HardBatchTripletLoss(0.3)(x, torch.tensor(labels))
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
        x.grad = None
    same = torch.ones(4, 3, requires_grad=True)  # all distances 0: the hinge is m
    loss = HardBatchTripletLoss(0.3)(same, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    # float32: m rounded to float32 (u32), a mean of 4 equal terms (3 roundings)
    assert float(loss.detach()) == pytest.approx(0.3, rel=4 * EPS32)
    assert torch.isfinite(same.grad).all()


def test_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="margin"):
        HardBatchTripletLoss(-0.1)
    with pytest.raises(ValueError, match="margin"):
        HardBatchTripletLoss(float("inf"))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        HardBatchTripletLoss()(torch.randn(4, 3), torch.tensor([0, 1, 0]))


def test_loss_and_sampler_import_from_every_public_path():
    """They live in skpool.models._triplet, re-exported by skpool.models and
    skpool.models.retrieval: the same objects from all three."""
    import skpool.models
    import skpool.models.retrieval as retrieval

    for name in ("HardBatchTripletLoss", "PKBatchSampler"):
        assert getattr(skpool.models, name) is getattr(retrieval, name)
        assert name in retrieval.__all__ and name in skpool.models.__all__


@pytest.mark.slow  # a fresh interpreter importing torch: seconds on a loaded machine
def test_loss_and_sampler_need_no_skorch():
    import subprocess
    import sys

    code = ("import sys; from skpool.models import HardBatchTripletLoss, PKBatchSampler; "
            "print(sorted(m for m in ('skorch', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_loss_and_sampler_docstring_examples():
    import doctest

    import skpool.models._triplet as triplet

    result = doctest.testmod(triplet)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- the sampler


def test_sampler_draws_p_labels_times_k_samples():
    # label: count = 0: 10, 1: 6, 2: 3, 3: 2, 4: 1 (a singleton, never drawn), 5: 5
    labels = np.repeat(np.array(["a", "b", "c", "d", "e", "f"]), [10, 6, 3, 2, 1, 5])
    np.random.default_rng(1).shuffle(labels)
    generator = torch.Generator().manual_seed(0)
    sampler = PKBatchSampler(labels, 3, 4, n_batches=300, generator=generator)
    assert len(sampler) == 300
    batches = list(sampler)
    assert len(batches) == 300
    seen = set()
    for batch in batches:
        assert len(set(batch)) == len(batch)  # no sample twice in a batch
        batch_labels, counts = np.unique(labels[batch], return_counts=True)
        assert len(batch_labels) == 3 and "e" not in batch_labels
        for label, count in zip(batch_labels, counts):
            assert count == min(4, np.sum(labels == label))
        seen.update(batch_labels)
    # P(a label of 5 is missed in 300 draws of 3) = (2/5)^300: every drawable label appears.
    assert seen == {"a", "b", "c", "d", "f"}
    # Fresh batches per pass, the same ones from the same seed.
    assert list(sampler) != batches
    again = PKBatchSampler(labels, 3, 4, n_batches=300, generator=torch.Generator().manual_seed(0))
    assert list(again) == batches


def test_sampler_defaults_and_caps():
    labels = np.repeat(np.arange(3), 8)
    sampler = PKBatchSampler(labels, n_labels_per_batch=18, n_samples_per_label=4)
    assert sampler.n_labels_per_batch == 3  # capped at the drawable labels
    assert len(sampler) == 2  # ceil(24 / (3 * 4))
    torch.manual_seed(5)
    first = list(sampler)
    torch.manual_seed(5)
    assert list(sampler) == first  # torch's global generator seeds it
    loader = torch.utils.data.DataLoader(torch.arange(24), batch_sampler=sampler)
    assert [len(batch) for batch in loader] == [12, 12]


@pytest.mark.parametrize(
    "labels, kwargs, match",
    [
        ([0, 0, 1, 1], {"n_labels_per_batch": 1}, "n_labels_per_batch"),
        ([0, 0, 1, 1], {"n_samples_per_label": 1}, "n_samples_per_label"),
        ([0, 0, 1, 1], {"n_samples_per_label": 2.5}, "n_samples_per_label"),
        ([0, 0, 1, 1], {"n_batches": 0}, "n_batches"),
        ([0, 0, 0, 1], {}, "two labels with two or more"),
        ([0, 1, 2, 3], {}, "two labels with two or more"),
        ([[0, 0], [1, 1]], {}, "1-D"),
    ],
)
def test_sampler_rejects_bad_arguments(labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PKBatchSampler(labels, **kwargs)


# --------------------------------------------------------------------------- the metrics


def reference_average_precision(embeddings, labels):
    """Slow AP per query for data without tied distances: a loop over queries and ranks."""
    result = []
    for q in range(len(labels)):
        others = [s for s in range(len(labels)) if s != q]
        distances = [np.linalg.norm(embeddings[q] - embeddings[s]) for s in others]
        ranked = [others[i] for i in np.argsort(distances)]
        relevant = [labels[s] == labels[q] for s in ranked]
        if not any(relevant):
            result.append(np.nan)
            continue
        precisions = [sum(relevant[: r + 1]) / (r + 1) for r in range(len(ranked))]
        result.append(sum(p for p, rel in zip(precisions, relevant) if rel) / sum(relevant))
    return np.array(result)


def test_average_precision_matches_the_slow_reference(rng):
    embeddings = rng.standard_normal((40, 3))  # continuous: no tied distances
    labels = rng.integers(0, 5, size=40)
    labels[0] = 9  # a singleton: no AP, left out of the mean
    per_query = average_precision_per_query(embeddings, labels)
    expected = reference_average_precision(embeddings, labels)
    assert np.isnan(per_query[0]) and np.isnan(expected[0])
    # Both are means of at most 39 positive ratios of integers (<= 1), each rounded once:
    # (39 + 2) eps of AP <= 1 per computation; the mean over 40 queries adds 40 eps.
    bound = 2 * (39 + 2) * EPS64
    np.testing.assert_allclose(per_query, expected, rtol=0, atol=bound)
    assert mean_average_precision(embeddings, labels) == pytest.approx(
        np.nanmean(expected), rel=0, abs=bound + 2 * 40 * EPS64
    )


def test_average_precision_matches_sklearn_per_query_with_ties(rng):
    # Embeddings on a coarse integer grid: many exactly tied distances. sklearn's step-wise AP
    # over scores -distance groups ties the way the module documents.
    embeddings = rng.integers(0, 3, size=(60, 2)).astype(float)
    labels = rng.choice(np.array(["x", "y", "z"]), size=60)
    per_query = average_precision_per_query(embeddings, labels)
    for q in range(60):
        others = np.arange(60) != q
        distances = np.linalg.norm(embeddings[others] - embeddings[q], axis=1)
        expected = average_precision_score(labels[others] == labels[q], -distances)
        # sums of at most 59 positive terms (<= 1), each a product or ratio: (59 + 2) eps each
        assert per_query[q] == pytest.approx(expected, rel=0, abs=2 * (59 + 2) * EPS64)


def test_metrics_by_hand():
    well_separated = np.array([[0, 0], [0.1, 0], [10, 0], [10, 0.1], [20, 0], [20.1, 0]])
    assert mean_average_precision(well_separated, [1, 1, 2, 2, 3, 3]) == 1.0
    assert top1_accuracy(well_separated, [1, 1, 2, 2, 3, 3]) == 1.0
    # Points 0, 1, 3, 6 labelled a, a, b, a. Query 0 ranks 1(a), 3(b), 6(a): AP (1 + 2/3)/2;
    # query 1 ranks 0(a), 3(b), 6(a): 5/6; query 6 ranks 3(b), 1(a), 0(a): (1/2 + 2/3)/2;
    # query 3 (b) has no relevant sample.
    points = np.array([[0.0], [1.0], [3.0], [6.0]])
    per_query = average_precision_per_query(points, ["a", "a", "b", "a"])
    # Rational values computed with a few roundings (a division per precision, a sum of two,
    # a mean of three) against Python's own rounded fractions: RATIONAL_RTOL
    np.testing.assert_allclose(per_query[[0, 1, 3]], [5 / 6, 5 / 6, 7 / 12], rtol=RATIONAL_RTOL)
    assert np.isnan(per_query[2])
    assert mean_average_precision(points, ["a", "a", "b", "a"]) == pytest.approx(
        (5 / 6 + 5 / 6 + 7 / 12) / 3, rel=RATIONAL_RTOL
    )
    assert top1_accuracy(points, ["a", "a", "b", "a"]) == pytest.approx(2 / 3, rel=RATIONAL_RTOL)
    # A tie: query 0 has 1(b) and -1(a) at distance 1, then 2(a). The tie group ends at rank 2
    # with one hit: AP = (1/2 + 2/3) / 2 = 7/12, top-1 = 1/2 (half the tied nearest are hits).
    tied = np.array([[0.0], [-1.0], [1.0], [2.0]])
    labels = ["a", "a", "b", "a"]
    assert average_precision_per_query(tied, labels)[0] == pytest.approx(7 / 12, rel=RATIONAL_RTOL)
    reversed_order = [0, 2, 1, 3]  # the order of the tied samples does not matter
    ap = average_precision_per_query(tied[reversed_order], [labels[i] for i in reversed_order])
    assert ap[0] == pytest.approx(7 / 12, rel=RATIONAL_RTOL)
    ranks = retrieval_metrics._rank_all(tied, labels)
    assert ranks.top1[0] == 0.5


def test_metrics_are_invariant_to_sample_order_and_blocking(rng, monkeypatch):
    embeddings = rng.integers(0, 4, size=(50, 3)).astype(np.float32)  # with ties
    labels = rng.integers(0, 6, size=50)
    per_query = average_precision_per_query(embeddings, labels)
    permutation = rng.permutation(50)
    permuted = average_precision_per_query(embeddings[permutation], labels[permutation])
    # Tie groups make the result order-free; only the summation order differs: two sums of
    # at most 49 positive terms, (49 + 2) eps each (the earlier 1e-14 was below that bound,
    # loosened to it)
    rtol = 2 * (49 + 2) * EPS64
    np.testing.assert_allclose(permuted, per_query[permutation], rtol=rtol)
    monkeypatch.setattr(retrieval_metrics, "_BLOCK_ENTRIES", 7)  # one query per block
    blocked = average_precision_per_query(embeddings, labels)
    np.testing.assert_allclose(blocked, per_query, rtol=rtol)
    as_tensor = average_precision_per_query(torch.from_numpy(embeddings), torch.from_numpy(labels))
    np.testing.assert_allclose(as_tensor, per_query, rtol=rtol)


@pytest.mark.parametrize(
    "embeddings, labels, match",
    [
        (np.zeros((3, 2)), [0, 1, 2], "No label occurs twice"),
        (np.zeros((3, 2)), [0, 0], "one label per embedding"),
        (np.array([[0.0], [np.nan]]), [0, 0], "NaN"),
        (np.zeros((1, 2)), [0], "minimum of 2"),
        (np.zeros(3), [0, 0, 1], "2D array"),
    ],
)
def test_metrics_reject_bad_input(embeddings, labels, match):
    with pytest.raises(ValueError, match=match):
        mean_average_precision(embeddings, labels)


# --------------------------------------------------------------------------- the estimator


def test_network_shapes_and_unit_norms():
    for global_pool in ("avg", "max", "gmp", "mixed", "lse"):
        net = PoolingEmbeddingNet(width=4, n_stages=2, global_pool=global_pool)
        out = net(torch.rand(5, 8, 8))
        assert out.shape == (5, 16)
        # float32 normalisation and this check's norm: two 16-term norms and a division,
        # (2 D + 2) eps32 (the earlier 1e-6 was below that bound, loosened to it)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(5), rtol=0,
                                   atol=(2 * 16 + 2) * EPS32)
    projected = PoolingEmbeddingNet(width=4, n_stages=2, embedding_dim=7)(torch.rand(5, 1, 8, 8))
    assert projected.shape == (5, 7)
    with pytest.raises(ValueError, match="embedding_dim"):
        PoolingEmbeddingNet(embedding_dim=0)


def test_paper_optimizer_and_lambda_learning_rate():
    net = DGMPEmbedder(**TINY).initialize()
    optimizer = net.optimizer_
    assert isinstance(optimizer, torch.optim.Adam)
    for group in optimizer.param_groups:
        assert group["amsgrad"] and group["betas"] == (0.9, 0.999)
        assert group["weight_decay"] == 1e-5
    lam_group, other = optimizer.param_groups
    assert lam_group["params"] == [net.module_.global_pool.log_lam]
    # lr x factor: one float64 product
    assert lam_group["lr"] == pytest.approx(2e-4 * 1e3, rel=EPS64) and other["lr"] == 2e-4
    # User param groups come first and win; λ's group still follows.
    net = DGMPEmbedder(**TINY, optimizer__param_groups=[("cnn.stem*", {"lr": 0.5})])
    net.initialize()
    stem, lam_group, _ = net.optimizer_.param_groups
    assert len(stem["params"]) == 2 and stem["lr"] == 0.5  # the stem's weight and bias
    assert lam_group["params"] == [net.module_.global_pool.log_lam]
    # set_params on an initialised net keeps the factor.
    net.set_params(lr=1e-3)
    assert net.optimizer_.param_groups[1]["lr"] == pytest.approx(1.0, rel=EPS64)
    net.set_params(lam_lr_factor=10.0)
    assert net.optimizer_.param_groups[1]["lr"] == pytest.approx(1e-2, rel=EPS64)
    assert net.optimizer_.param_groups[-1]["lr"] == 1e-3  # set as is
    with pytest.raises(ValueError, match="lam_lr_factor"):
        DGMPEmbedder(**TINY, lam_lr_factor=-1.0).initialize()


@pytest.mark.parametrize("factor", [1.0, 1e3])
def test_lambda_takes_a_step_of_lr_times_the_factor(digits, factor):
    X_train, _, y_train, _ = digits
    index = np.concatenate([np.flatnonzero(y_train == 0)[:4], np.flatnonzero(y_train == 1)[:4]])
    # 2 labels x 4 images with P = 2, K = 4: one batch, so one optimiser step.
    net = DGMPEmbedder(
        **TINY, max_epochs=1, n_labels_per_batch=2, lam_lr_factor=factor,
        criterion__margin=2.0,  # > every distance of unit vectors: the loss is positive
        module__lam=1.0,  # theta = 0: float32 rounds a step of 2e-4 to ~1e-11, not to 5e-7
    )
    net.initialize()
    before = float(net.module_.global_pool.log_lam.detach())
    net.partial_fit(X_train[index], y_train[index])
    assert len(net.history[-1, "batches"]) == 1
    step = abs(float(net.module_.global_pool.log_lam.detach()) - before)
    # Adam's (and AMSGrad's) first step is lr * g / (|g| + 1e-8): lr to 1e-8 / |g| relative
    # (g read back from the first moment, (1 - beta1) g), plus a few float32 roundings of the
    # update and of theta (0 before it: no cancellation).
    parameter = net.module_.global_pool.log_lam
    gradient = abs(float(net.optimizer_.state[parameter]["exp_avg"])) / (1 - 0.9)
    assert step == pytest.approx(2e-4 * factor, rel=1e-8 / gradient + 6 * EPS32)


def test_module_and_criterion_routing_clone_and_set_params():
    net = DGMPEmbedder(**TINY, module__lam=10.0, criterion__margin=0.4).initialize()
    assert isinstance(net.module_.global_pool, GeneralizedMaxPool2d)
    assert float(net.module_.global_pool.lam.detach()) == pytest.approx(  # float32 exp(log 10)
        10.0, rel=EPS32 * (np.log(10.0) / 2 + 1))
    assert net.criterion_.margin == 0.4
    net.set_params(module__global_pool="max", criterion__margin=0.1)
    assert isinstance(net.module_.global_pool, torch.nn.AdaptiveMaxPool2d)
    assert net.criterion_.margin == 0.1
    cloned = clone(net)
    assert not hasattr(cloned, "module_")
    params = cloned.get_params()
    assert params["module__global_pool"] == "max" and params["criterion__margin"] == 0.1
    assert params["optimizer__amsgrad"] is True and params["lam_lr_factor"] == 1e3
    assert PoolingEmbedder().get_params()["lam_lr_factor"] == 1.0
    with pytest.raises(ValueError, match="margin"):
        DGMPEmbedder(**TINY, criterion__margin=-1.0).initialize()


def test_fit_transform_score_pickle_and_determinism(digits):
    X_train, X_test, y_train, y_test = digits
    words = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])
    net = DGMPEmbedder(**TINY, max_epochs=1).fit(X_train[:200], words[y_train[:200]])
    assert list(net.classes_) == sorted(words)
    embeddings = net.transform(X_test)
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(X_test), 16)
    # two 16-term float32 norms and a division (see test_network_shapes_and_unit_norms)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=0,
                               atol=(2 * 16 + 2) * EPS32)
    score = net.score(X_test, words[y_test])
    assert score == mean_average_precision(embeddings, y_test)  # labels' names do not matter
    assert mean_average_precision_scorer(net, X_test, y_test) == score
    assert 0 < top1_accuracy_scorer(net, X_test, y_test) <= 1
    restored = pickle.loads(pickle.dumps(net))
    np.testing.assert_array_equal(restored.transform(X_test), embeddings)  # same code path
    again = DGMPEmbedder(**TINY, max_epochs=1).fit(X_train[:200], words[y_train[:200]])
    # exact: the same seed, code, data and shapes (deterministic on CPU)
    np.testing.assert_array_equal(again.transform(X_test), embeddings)
    np.testing.assert_array_equal(
        DGMPEmbedder(**TINY, max_epochs=1).fit_transform(X_train[:200], words[y_train[:200]]),
        again.transform(X_train[:200]),
    )


def test_validation_split_draws_batches_from_its_subset(digits):
    X_train, _, y_train, _ = digits
    net = PoolingEmbedder(**TINY, max_epochs=1, train_split=ValidSplit(4, stratified=True))
    net.fit(X_train[:200], y_train[:200])
    assert np.isfinite(net.history[-1, "valid_loss"]) and np.isfinite(net.history[-1, "train_loss"])


@pytest.mark.parametrize(
    "X, y, kwargs, match",
    [
        (np.zeros((8, 64)), np.arange(8) % 2, {}, "Reshape flat digits"),
        (np.zeros((8, 8, 8)), None, {}, "y is required"),
        (np.zeros((8, 8, 8)), np.arange(7) % 2, {}, "one per image"),
        (np.zeros((8, 8, 8)), np.zeros(8), {}, "two labels with two or more"),
        (np.zeros((8, 8, 8)), np.arange(8), {}, "two labels with two or more"),
        (np.zeros((8, 8, 8)), np.arange(8) % 2, {"n_samples_per_label": 1}, "n_samples_per"),
        (np.full((8, 8, 8), np.inf), np.arange(8) % 2, {}, "NaN or infinity"),
    ],
)
def test_fit_rejects_bad_input_before_training(X, y, kwargs, match):
    net = DGMPEmbedder(**TINY, max_epochs=1, **kwargs)
    with pytest.raises(ValueError, match=match):
        net.fit(X, y)
    assert not hasattr(net, "module_") and not hasattr(net, "classes_")


@requires_cuda
@pytest.mark.gpu
def test_embedder_and_loss_on_cuda(digits, rng):
    X_train, X_test, y_train, _ = digits
    net = DGMPEmbedder(**TINY, max_epochs=1, device="cuda").fit(X_train[:100], y_train[:100])
    embeddings = net.transform(X_test[:20])
    assert isinstance(embeddings, np.ndarray) and np.all(np.isfinite(embeddings))
    batch, labels = random_batch(rng)
    on_cpu = HardBatchTripletLoss(0.5)(torch.from_numpy(batch), torch.from_numpy(labels))
    on_cuda = HardBatchTripletLoss(0.5)(
        torch.from_numpy(batch).cuda(), torch.from_numpy(labels).cuda()
    )
    # two float64 computations (other kernels), each within the loss's rounding bound
    bound = 2 * triplet_loss_bound(len(labels), batch.shape[1], 0.5, EPS64)
    assert float(on_cuda) == pytest.approx(float(on_cpu), rel=0, abs=bound)


@pytest.mark.slow
@pytest.mark.parametrize("global_pool", ["avg", "max", "mixed", "lse", "gmp"])
def test_training_improves_retrieval_on_digits(digits, global_pool):
    X_train, X_test, y_train, y_test = digits
    net = PoolingEmbedder(
        module__width=8, module__n_stages=2, module__global_pool=global_pool, max_epochs=3,
        lam_lr_factor=1e3, random_state=0,
    )
    before = net.initialize().score(X_test, y_test)  # the same initial network
    after = net.fit(X_train, y_train).score(X_test, y_test)
    assert after > before + 0.02


@pytest.mark.slow
def test_grid_search_tunes_margin_and_initial_lambda_by_map(digits):
    X_train, X_test, y_train, y_test = digits
    grid = {"criterion__margin": [0.1, 0.5], "module__lam": [1.0, 1e3]}
    search = GridSearchCV(
        DGMPEmbedder(module__width=8, module__n_stages=2, max_epochs=2, random_state=0),
        grid,
        scoring={"map": mean_average_precision_scorer, "top1": top1_accuracy_scorer},
        refit="map",
        cv=2,
    ).fit(X_train, y_train)
    scores = search.cv_results_["mean_test_map"]
    assert len(scores) == 4 and np.all((scores > 0) & (scores <= 1))
    assert np.all(np.isfinite(search.cv_results_["mean_test_top1"]))
    assert search.best_params_["criterion__margin"] in grid["criterion__margin"]
    assert search.best_params_["module__lam"] in grid["module__lam"]
    best = search.best_estimator_
    assert best.criterion_.margin == search.best_params_["criterion__margin"]
    untrained = clone(best).initialize().score(X_test, y_test)
    assert best.score(X_test, y_test) > untrained
    # Without `scoring`, GridSearchCV uses the estimator's score: the same mAP.
    default = GridSearchCV(
        DGMPEmbedder(**TINY, max_epochs=1), {"criterion__margin": [0.2]}, cv=2
    ).fit(X_train[:200], y_train[:200])
    refit = DGMPEmbedder(**TINY, max_epochs=1).fit(X_train[:200], y_train[:200])
    assert default.best_estimator_.score(X_test, y_test) == refit.score(X_test, y_test)
