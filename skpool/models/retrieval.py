r"""Deep Generalized Max Pooling for retrieval (Christlein et al. 2019): an embedding estimator.

A CNN (:class:`~skpool.models.PoolingCNN`'s convolutional trunk) ends in a global pooling
(average, max, mixed, log-sum-exp, or generalized max pooling with a learnable λ) and an
l2-normalised embedding; it is pre-trained with cross-entropy on the training labels
(``pretrain_epochs``, 5 by default: the papers start from ImageNet weights, and from scratch the
triplet loss alone collapses the embeddings), then trained with the batch-hard triplet loss of
Hermans et al. (2017) on batches of P labels × K samples, with AMSGrad (β = 0.9, 0.999, weight decay 1e-5,
learning rate 2e-4) and a larger learning rate for λ, as in the paper's writer-retrieval
experiments. ``transform`` returns the embeddings; retrieval is then a nearest-neighbour
search, scored by :mod:`skpool.evaluation` (mean average precision, top-1), which
GridSearchCV uses to tune the margin and the initial λ.

- :class:`HardBatchTripletLoss` — the loss, usable on its own, and :class:`PKBatchSampler` —
  the P × K batch sampler, usable with any ``DataLoader`` (both defined in ``_triplet.py``,
  which needs neither skorch nor scikit-learn).
- :class:`PoolingEmbeddingNet` — the network.
- :class:`PoolingEmbedder`, :class:`DGMPEmbedder` — the skorch estimators.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from skorch import NeuralNet
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import column_or_1d
from torch import nn

from .._device import CheckedMoves, resolve_device
from .._parameters import MAX_COUNT
from ..evaluation.retrieval import mean_average_precision
from ._skorch import (
    LamLearningRate,
    check_images,
    check_labels,
    keeps_fit_on_failure,
    seed_torch,
)
from ._triplet import HardBatchTripletLoss, PKBatchSampler
from .cnn import PoolingCNN

__all__ = [
    "HardBatchTripletLoss",
    "PKBatchSampler",
    "PoolingEmbeddingNet",
    "PoolingEmbedder",
    "DGMPEmbedder",
]

#: Batch size of the cross-entropy pre-training (the value its measurements used).
PRETRAIN_BATCH_SIZE = 64


class PoolingEmbeddingNet(CheckedMoves, nn.Module):
    r"""An image embedding network: :class:`~skpool.models.PoolingCNN`'s trunk, a global
    pooling, an optional linear projection, and l2 normalisation.

    .. math::

        e(x) = \frac{W\, \mathrm{pool}(f(x))}{\|W\, \mathrm{pool}(f(x))\|_2}

    with f the CNN's stem and stages, pool the global pooling and W the projection (the
    identity with ``embedding_dim=None``; generalized max pooling's output is then the
    embedding, as in Christlein et al.). A zero vector stays zero.

    Args:
        in_channels, width, n_stages, stage_pooling: the CNN's, see
            :class:`~skpool.models.PoolingCNN` (defaults are its own).
        global_pool: "avg", "max", "gmp", "mixed" or "lse". Default: "avg".
        lam: initial λ of "gmp" (learned as exp(θ)). Default: 1.0.
        lam_scale: "relative" (scale-free, in units of trace(ΦᵀΦ)/N) or "absolute" (the
            paper's λ₀ ∈ {1, 1e3, 1e5}). Default: "relative".
        embedding_dim: output size of a linear projection after the pooling, or None for
            none (the embedding has the last stage's channels). Default: None.
        **cnn_kwargs: further :class:`~skpool.models.PoolingCNN` arguments.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`, or :math:`(B, H, W)` when ``in_channels == 1``.
        - Output: :math:`(B, D)`, rows of unit l2 norm.

    Examples::

        >>> import torch
        >>> from skpool.models.retrieval import PoolingEmbeddingNet
        >>> net = PoolingEmbeddingNet(width=8, n_stages=2, global_pool="gmp", embedding_dim=16)
        >>> net(torch.randn(4, 8, 8)).shape
        torch.Size([4, 16])
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 64,
        n_stages: int = 3,
        stage_pooling: str | tuple[str, ...] = "strided",
        global_pool: str = "avg",
        lam: float = 1.0,
        lam_scale: str = "relative",
        embedding_dim: int | None = None,
        **cnn_kwargs,
    ) -> None:
        super().__init__()
        cnn = PoolingCNN(
            in_channels=in_channels,
            width=width,
            n_stages=n_stages,
            stage_pooling=stage_pooling,
            global_pool=global_pool,
            lam=lam,
            lam_scale=lam_scale,
            **cnn_kwargs,
        )
        if embedding_dim is None:
            cnn.head = nn.Identity()
        elif isinstance(embedding_dim, Integral) and 1 <= embedding_dim <= MAX_COUNT:
            cnn.head = nn.Linear(cnn.head.in_features, int(embedding_dim))
        else:
            raise ValueError(
                f"embedding_dim must be None or an integer in [1, {MAX_COUNT}], got "
                f"{embedding_dim!r}."
            )
        self.cnn = cnn

    @property
    def global_pool(self) -> nn.Module:
        """The global pooling layer (e.g. a :class:`~skpool.nn.GeneralizedMaxPool2d`)."""
        return self.cnn.global_pool

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before its l2 normalisation (what the cross-entropy pre-training of
        :class:`PoolingEmbedder` puts a linear classifier on)."""
        return self.cnn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.cnn(x), dim=1)


class PoolingEmbedder(LamLearningRate, NeuralNet):
    """A retrieval embedding learned with the batch-hard triplet loss, as a scikit-learn
    transformer (skorch).

    ``fit(X, y)`` trains :class:`PoolingEmbeddingNet` on batches of P labels × K samples
    (:class:`PKBatchSampler`) with :class:`HardBatchTripletLoss`; ``transform(X)`` returns the
    l2-normalised embeddings; ``score(X, y)`` is their retrieval mean average precision
    (:func:`skpool.evaluation.mean_average_precision`), so GridSearchCV can tune the
    margin (``criterion__margin``), the initial λ (``module__lam``) and anything else without
    a ``scoring`` argument (or with ``scoring=top1_accuracy_scorer``).

    The optimiser defaults are the paper's (Christlein et al. 2019): AMSGrad
    (``torch.optim.Adam`` with ``optimizer__amsgrad=True``, ``optimizer__betas=(0.9, 0.999)``,
    ``optimizer__weight_decay=1e-5``) at ``lr=2e-4``.

    Parameters
    ----------
    module : torch module class, default=PoolingEmbeddingNet
        Its arguments are set with ``module__<name>`` (``module__width``,
        ``module__n_stages``, ``module__global_pool``, ``module__lam``,
        ``module__embedding_dim``, ...). It must return one embedding row per image.
    n_labels_per_batch, n_samples_per_label : int, default=18, 4
        P and K of the training batches (Hermans et al.'s values); P is capped at the number
        of labels with two or more samples. ``batch_size`` applies to ``transform`` and a
        validation split only.
    pretrain_epochs : int >= 0, default=5
        Epochs of cross-entropy pre-training before the triplet training: a temporary linear
        classifier on the module's ``features`` (the embedding before normalisation) learns
        the training labels with the network (Adam at ``pretrain_lr``, shuffled batches of
        64, λ at the plain learning rate), then is discarded. The papers start from
        ImageNet-trained weights; from scratch, the batch-hard triplet loss alone drives all
        embeddings together on SVHN-like digits (measured: unseen-class mAP 22.1–22.7 against
        22.2 untrained; after 5 epochs of pre-training, 29.7). 0 skips it. The module must
        have a ``features(x)`` method when it is > 0 (:class:`PoolingEmbeddingNet` has).
    pretrain_lr : float > 0, default=1e-3
        The pre-training's learning rate.
    lam_lr_factor : float, default=1.0
        The learning rate of every parameter named ``*log_lam`` (the learnable λ = exp(θ) of
        generalized max pooling) is ``lr * lam_lr_factor``: an extra group in skorch's
        ``optimizer__param_groups``, after any the user gives (the first matching pattern
        wins). ``set_params(lr=...)`` or ``set_params(lam_lr_factor=...)`` on an initialised
        net update the optimiser's groups in place (their state kept): groups holding only
        λ parameters get ``lr * lam_lr_factor``, the others ``lr``.
    random_state : int or None, default=None
        Seeds torch before the module is built; the batches are drawn from torch's generator
        too, so the same seed gives the same embedding on CPU.
    device : {"auto", "cpu", "cuda", "cuda:<index>"}, default="auto"
        Resolved in ``initialize`` ("auto": CUDA when available); CUDA without CUDA is a
        ValueError.
    criterion, optimizer, lr, max_epochs, batch_size, train_split, verbose, **kwargs
        As in :class:`skorch.NeuralNet` (``criterion__margin`` sets the loss's margin, 0.2 by
        default). No internal validation split by default.

    Attributes
    ----------
    classes_ : ndarray of shape (n_labels,)
        The labels seen in ``fit`` (any labels scikit-learn accepts; encoded internally).
    module_, criterion_, optimizer_, history_
        As in skorch.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import load_digits
    >>> from skpool.models.retrieval import PoolingEmbedder
    >>> X, y = load_digits(return_X_y=True)
    >>> images = (X / 16).reshape(-1, 8, 8).astype(np.float32)
    >>> embedder = PoolingEmbedder(
    ...     module__width=8, module__n_stages=2, module__global_pool="gmp", max_epochs=1,
    ...     random_state=0,
    ... ).fit(images[:300], y[:300])
    >>> embedder.transform(images[300:310]).shape  # the last stage's 8 * 2**2 channels
    (10, 32)
    """

    def __init__(
        self,
        module=PoolingEmbeddingNet,
        *,
        n_labels_per_batch=18,
        n_samples_per_label=4,
        pretrain_epochs=5,
        pretrain_lr=1e-3,
        lam_lr_factor=1.0,
        random_state=None,
        criterion=HardBatchTripletLoss,
        optimizer=torch.optim.Adam,
        lr=2e-4,
        max_epochs=10,
        batch_size=128,
        train_split=None,
        verbose=0,
        device="auto",
        **kwargs,
    ):
        kwargs.setdefault("optimizer__amsgrad", True)
        kwargs.setdefault("optimizer__betas", (0.9, 0.999))
        kwargs.setdefault("optimizer__weight_decay", 1e-5)
        super().__init__(
            module,
            criterion=criterion,
            optimizer=optimizer,
            lr=lr,
            max_epochs=max_epochs,
            batch_size=batch_size,
            train_split=train_split,
            verbose=verbose,
            device=device,
            **kwargs,
        )
        self.n_labels_per_batch = n_labels_per_batch
        self.n_samples_per_label = n_samples_per_label
        self.pretrain_epochs = pretrain_epochs
        self.pretrain_lr = pretrain_lr
        self.lam_lr_factor = lam_lr_factor
        self.random_state = random_state

    def initialize(self):
        self.device = str(resolve_device(self.device))
        seed_torch(self.random_state)
        return super().initialize()

    def get_iterator(self, dataset, training=False):
        if not training:
            return super().get_iterator(dataset, training=False)
        sampler = PKBatchSampler(
            _dataset_labels(dataset), self.n_labels_per_batch, self.n_samples_per_label
        )
        kwargs = self.get_params_for("iterator_train")
        for batching in ("batch_size", "shuffle", "sampler", "drop_last"):
            kwargs.pop(batching, None)  # the batch sampler decides these
        return self.iterator_train(dataset, batch_sampler=sampler, **kwargs)

    @keeps_fit_on_failure
    def fit(self, X, y=None, **fit_params):
        """Train on images X (n, H, W) or (n, C, H, W) with labels y (n,), any kind."""
        X = check_images(X)
        if y is None:
            raise ValueError("y is required: the label (writer, class, ...) of every image.")
        y = column_or_1d(y.cpu().numpy() if isinstance(y, torch.Tensor) else y, warn=True)
        if len(y) != len(X):
            raise ValueError(f"y has {len(y)} labels for {len(X)} images; give one per image.")
        y = check_labels(y, len(X))  # as the classifiers: no None, NaN or continuous labels
        encoder = LabelEncoder().fit(y)
        codes = encoder.transform(y).astype(np.int64)
        # Check the sampler's parameters and the labels before any training.
        PKBatchSampler(codes, self.n_labels_per_batch, self.n_samples_per_label)
        epochs, lr = self._check_pretraining()
        # skorch's fit, with the pre-training between initialisation and the triplet epochs
        if not (self.warm_start and self.initialized_):
            self.initialize()
            if epochs:
                self._pretrain(X, codes, epochs, lr)
        self.partial_fit(X, codes, **fit_params)
        self.classes_ = encoder.classes_
        return self

    def _check_pretraining(self) -> tuple[int, float]:
        epochs, lr = self.pretrain_epochs, self.pretrain_lr
        if isinstance(epochs, bool) or not isinstance(epochs, Integral) or epochs < 0:
            raise ValueError(f"pretrain_epochs must be an integer >= 0, got {epochs!r}.")
        if not (isinstance(lr, Real) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"pretrain_lr must be a finite number > 0, got {lr!r}.")
        return int(epochs), float(lr)

    def _pretrain(self, X, codes: np.ndarray, epochs: int, lr: float) -> None:
        """Cross-entropy pre-training of the module with a temporary linear classifier."""
        module = self.module_
        features = getattr(module, "features", None)
        if not callable(features):
            raise TypeError(
                f"pretrain_epochs={epochs} needs a module with a features(x) method (the "
                f"embedding before normalisation); {type(module).__name__} has none. Set "
                "pretrain_epochs=0 or add the method."
            )
        images = torch.as_tensor(X)
        targets = torch.as_tensor(codes)
        module.eval()  # the probe leaves batch-norm statistics alone
        with torch.no_grad():
            dim = features(images[:1].to(self.device)).shape[1]
        module.train()
        head = nn.Linear(dim, int(codes.max()) + 1).to(self.device)
        optimizer = torch.optim.Adam([*module.parameters(), *head.parameters()], lr=lr)
        for _ in range(epochs):
            for batch in torch.randperm(len(images)).split(PRETRAIN_BATCH_SIZE):
                if len(batch) < 2:  # batch norm cannot train on one image
                    continue
                x = images[batch].to(self.device)
                loss = F.cross_entropy(head(features(x)), targets[batch].to(self.device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    def transform(self, X) -> np.ndarray:
        """The embeddings of images X: (n, D) float32, rows of unit l2 norm."""
        X = check_images(X)
        return self.forward(X, training=False).numpy()

    def fit_transform(self, X, y=None, **fit_params) -> np.ndarray:
        return self.fit(X, y, **fit_params).transform(X)

    def score(self, X, y) -> float:
        """Retrieval mean average precision of the embeddings of X (every image queries all
        the others; relevant = same label)."""
        return mean_average_precision(self.transform(X), y)


class DGMPEmbedder(PoolingEmbedder):
    """:class:`PoolingEmbedder` with the Deep Generalized Max Pooling head of Christlein et
    al. (2019): ``module__global_pool="gmp"`` and λ's learning rate multiplied by
    ``lam_lr_factor=1000`` (the paper's factor for writer retrieval; 100 for CLaMM17).

    ``module__lam`` is the initial λ (the paper tries 1, 1e3, 1e5 for ResNet-50 features).
    Everything else is as in :class:`PoolingEmbedder`.

    Examples
    --------
    >>> from sklearn.model_selection import GridSearchCV
    >>> from skpool.models.retrieval import DGMPEmbedder
    >>> search = GridSearchCV(
    ...     DGMPEmbedder(module__width=8, module__n_stages=2, max_epochs=2),
    ...     {"criterion__margin": [0.1, 0.5], "module__lam": [0.1, 1.0]},
    ...     cv=2,
    ... )  # search.fit(images, labels) picks the best mean average precision
    """

    def __init__(self, module=PoolingEmbeddingNet, *, lam_lr_factor=1e3, **kwargs):
        kwargs.setdefault("module__global_pool", "gmp")
        super().__init__(module, lam_lr_factor=lam_lr_factor, **kwargs)


def _dataset_labels(dataset) -> np.ndarray:
    """The labels of a skorch Dataset (or a Subset of one, as skorch's validation split
    makes), for the P × K batch sampler."""
    if isinstance(dataset, torch.utils.data.Subset):
        return _dataset_labels(dataset.dataset)[np.asarray(dataset.indices)]
    labels = getattr(dataset, "y", None)
    if labels is None:
        raise ValueError(
            "PoolingEmbedder draws its training batches by label: the training dataset must "
            f"carry its labels as `.y` (a skorch Dataset does); got {type(dataset).__name__}."
        )
    return np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
