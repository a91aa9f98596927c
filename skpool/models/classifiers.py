"""skorch classifiers that run the papers' procedures and tune with plain scikit-learn syntax.

- :class:`PoolingCNNClassifier` — :class:`~skpool.models.PoolingCNN` as a scikit-learn
  classifier (any stage/global pooling), with ``device="auto"`` and a ``random_state``.
- :class:`DGMPClassifier` — the CNN with a learnable-λ generalized max pooling head
  (Christlein et al. 2019); ``module__lam`` is the initial λ, ``lam_lr_factor`` scales λ's
  learning rate (the paper multiplies it by up to 1000).
- :class:`SeparabilityPoolingClassifier` — Birodkar et al.'s procedure in ``fit``: train with a
  default pooling at one stage, fit :class:`~skpool.SeparabilityPooling` on that stage's
  training feature maps, swap in the learned :class:`~skpool.nn.SeparabilityPool2d`, retrain.

Input images are arrays or tensors of shape ``(n, H, W)`` (one channel, e.g. digits reshaped to
``(n, 8, 8)``) or ``(n, C, H, W)`` (channels first, as torch layers take them), converted to
float32. Labels are integer class indices ``0 .. n_classes - 1`` (skorch's convention), with
``module__n_classes`` set to their number (10 by default).
"""

from __future__ import annotations

import inspect
import math
from numbers import Real

import numpy as np
import torch
from skorch import NeuralNetClassifier
from skorch.dataset import Dataset

from .._device import resolve_device
from ..nn import SeparabilityPool2d
from .cnn import N_STAGES, PoolingCNN

__all__ = ["PoolingCNNClassifier", "DGMPClassifier", "SeparabilityPoolingClassifier"]


def check_images(X) -> np.ndarray | torch.Tensor:
    """Validate images: (n, H, W) or (n, C, H, W), finite, as float32."""
    if isinstance(X, Dataset | torch.utils.data.Dataset):
        return X
    if isinstance(X, torch.Tensor):
        if X.is_complex():
            raise TypeError(
                f"Images must be real numbers (float, int or bool), got dtype {X.dtype}."
            )
        images = X.detach().to(torch.float32)
        finite = bool(torch.isfinite(images).all())
    else:
        images = np.asarray(X)
        if images.dtype.kind not in "fiub":
            raise TypeError(
                f"Images must be real numbers (float, int or bool), got dtype {images.dtype}."
            )
        images = images.astype(np.float32, copy=False)
        finite = bool(np.isfinite(images).all())
    if images.ndim not in (3, 4):
        raise ValueError(
            "Images must have shape (n, H, W) or (n, C, H, W) (channels first); got "
            f"{images.ndim}-D input of shape {tuple(images.shape)}. Reshape flat digits with "
            "X.reshape(-1, 8, 8)."
        )
    if images.shape[0] == 0:
        raise ValueError("Found 0 images.")
    if not finite:
        raise ValueError("Input images contain NaN or infinity.")
    return images


class PoolingCNNClassifier(NeuralNetClassifier):
    """:class:`~skpool.models.PoolingCNN` as a scikit-learn classifier (skorch).

    Parameters
    ----------
    module : torch module class, default=PoolingCNN
        Its constructor arguments are set with ``module__<name>`` (e.g. ``module__width``,
        ``module__stage_pooling``, ``module__global_pool``, ``module__lam``).
    random_state : int or None, default=None
        Seeds torch before the module is built and trained: the same seed gives the same
        network on CPU.
    device : {"auto", "cpu", "cuda", "cuda:<index>"}, default="auto"
        Resolved in ``initialize``: "auto" becomes "cuda" when available, else "cpu", and the
        resolved name is what ``device`` holds afterwards (skorch moves tensors with it).
        Requesting CUDA without CUDA raises ValueError.
    criterion, optimizer, lr, max_epochs, batch_size, train_split, verbose, **kwargs
        As in :class:`skorch.NeuralNetClassifier`; the defaults suit small image sets
        (cross-entropy on logits, Adam at 1e-3, 10 epochs, batches of 64, no internal
        validation split).
    """

    def __init__(
        self,
        module=PoolingCNN,
        *,
        random_state=None,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=1e-3,
        max_epochs=10,
        batch_size=64,
        train_split=None,
        verbose=0,
        device="auto",
        **kwargs,
    ):
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
        self.random_state = random_state

    def initialize(self):
        self.device = str(resolve_device(self.device))
        if self.random_state is not None:
            torch.manual_seed(self.random_state)
        return super().initialize()

    def get_dataset(self, X, y=None):
        return super().get_dataset(check_images(X), y)

    def fit(self, X, y=None, **fit_params):
        X = check_images(X)
        if y is not None:
            y = _check_labels(y, len(X), self._n_classes())
        return super().fit(X, y, **fit_params)

    def _n_classes(self) -> int | None:
        """The module's number of outputs (``module__n_classes`` or its default), if known."""
        n_classes = self.get_params_for("module").get("n_classes")
        if n_classes is None:
            try:
                parameter = inspect.signature(self.module).parameters.get("n_classes")
            except (TypeError, ValueError):  # a module instance, or no signature
                parameter = None
            if parameter is not None and parameter.default is not inspect.Parameter.empty:
                n_classes = parameter.default
        return None if n_classes is None else int(n_classes)


class DGMPClassifier(PoolingCNNClassifier):
    """The CNN with a Deep Generalized Max Pooling head (Christlein et al. 2019).

    ``module__lam`` is the initial λ of the :class:`~skpool.nn.GeneralizedMaxPool2d` head
    (learned through λ = exp(θ)); GridSearchCV tunes it like any parameter.

    Parameters
    ----------
    lam_lr_factor : float, default=1.0
        λ's learning rate is ``lr * lam_lr_factor`` (the paper uses up to 1000).
    **kwargs
        As in :class:`PoolingCNNClassifier`; ``module__global_pool`` defaults to "gmp".
    """

    def __init__(self, module=PoolingCNN, *, lam_lr_factor=1.0, **kwargs):
        kwargs.setdefault("module__global_pool", "gmp")
        super().__init__(module, **kwargs)
        self.lam_lr_factor = lam_lr_factor

    def initialize_optimizer(self, *args, **kwargs):
        factor = self.lam_lr_factor
        if not (isinstance(factor, Real) and math.isfinite(factor) and factor >= 0):
            raise ValueError(f"lam_lr_factor must be a finite number >= 0, got {factor!r}.")
        named = list(self.get_all_learnable_params())
        lam_params = [param for name, param in named if name.endswith("log_lam")]
        others = [(name, param) for name, param in named if not name.endswith("log_lam")]
        groups, optimizer_kwargs = self.get_params_for_optimizer("optimizer", others)
        param_groups = list(groups[0])
        if lam_params:
            lr = optimizer_kwargs.get("lr", self.lr)
            param_groups.append({"params": lam_params, "lr": lr * self.lam_lr_factor})
        self.optimizer_ = self.optimizer(param_groups, **optimizer_kwargs)
        return self


class SeparabilityPoolingClassifier(PoolingCNNClassifier):
    """Birodkar et al.'s procedure: a CNN whose pooling at one stage is learned in closed form.

    ``fit`` (1) trains the network with ``baseline_pooling`` at stage ``stage``, (2) computes
    that stage's feature maps on the training images, (3) fits
    :class:`~skpool.SeparabilityPooling` (``alpha``, ``norm``, ``n_components``, stride 2) on
    them, (4) replaces the stage's pooling by the fitted
    :class:`~skpool.nn.SeparabilityPool2d` and (5) trains again, from scratch (the paper) or
    from the first network's weights (``retrain="finetune"``). Every step depends on the
    parameters, so each GridSearchCV candidate refits all of them.

    Parameters
    ----------
    stage : int, default=0
        Which of the three stages gets the learned pooling (0 = the first, at full resolution).
    alpha, norm, n_components
        Passed to :class:`~skpool.SeparabilityPooling`.
    baseline_pooling : {"avg", "max"}, default="avg"
        The stage's pooling while the feature maps are learned.
    retrain : {"scratch", "finetune"}, default="scratch"
    **kwargs
        As in :class:`PoolingCNNClassifier` (``module__stage_pooling`` sets the other stages,
        "strided" by default).

    Attributes
    ----------
    separability_pooling_ : SeparabilityPooling
        The operator fitted on the stage's training feature maps.
    baseline_net_ : PoolingCNNClassifier
        The fitted network of step (1).
    stage_maps_shape_ : tuple
        (C, H, W) of the stage's feature maps.
    """

    def __init__(
        self,
        module=PoolingCNN,
        *,
        stage=0,
        alpha=1.0,
        norm="l2",
        n_components=1,
        baseline_pooling="avg",
        retrain="scratch",
        **kwargs,
    ):
        super().__init__(module, **kwargs)
        self.stage = stage
        self.alpha = alpha
        self.norm = norm
        self.n_components = n_components
        self.baseline_pooling = baseline_pooling
        self.retrain = retrain

    def fit(self, X, y=None, **fit_params):
        from .. import SeparabilityPooling  # the estimator layer sits beside the models

        self._check_procedure_params()
        X = check_images(X)
        y = _check_labels(y, len(X), self._n_classes())
        baseline = PoolingCNNClassifier(**self._baseline_params()).fit(X, y, **fit_params)
        maps = _stage_maps(baseline.module_, X, self.stage, self.batch_size, baseline.device)
        separability = SeparabilityPooling(
            alpha=self.alpha,
            stride=2,
            n_components=self.n_components,
            norm=self.norm,
            device=baseline.device,
        ).fit(maps.transpose(0, 2, 3, 1), y)
        self.baseline_net_ = baseline
        self.separability_pooling_ = separability
        self.stage_maps_shape_ = tuple(maps.shape[1:])
        return super().fit(X, y, **fit_params)

    def initialize_module(self):
        if not hasattr(self, "separability_pooling_"):
            raise RuntimeError(
                "SeparabilityPoolingClassifier builds its module in fit (after fitting the "
                "operator); call fit first."
            )
        kwargs = self.get_params_for("module")
        kwargs["stage_pooling"] = self._stage_pooling("separability")
        kwargs["n_components"] = self.n_components
        module = self.module(**kwargs)
        module.set_separability_pool(
            self.stage, SeparabilityPool2d.from_estimator(self.separability_pooling_)
        )
        if self.retrain == "finetune":
            _load_matching_weights(module, self.baseline_net_.module_)
        self.module_ = module
        return self

    def _stage_pooling(self, pooling):
        module_params = self.get_params_for("module")
        stages = module_params.get("stage_pooling", "strided")
        n_stages = module_params.get("n_stages", N_STAGES)
        stages = [stages] * n_stages if isinstance(stages, str) else list(stages)
        stages[self.stage] = pooling
        return tuple(stages)

    def _baseline_params(self) -> dict:
        own = set(PoolingCNNClassifier._get_param_names(self)) - {
            "stage", "alpha", "norm", "n_components", "baseline_pooling", "retrain"
        }
        params = {name: getattr(self, name) for name in own if hasattr(self, name)}
        params["module__stage_pooling"] = self._stage_pooling(self.baseline_pooling)
        params.pop("module__n_components", None)
        return params

    def _check_procedure_params(self):
        n_stages = self.get_params_for("module").get("n_stages", N_STAGES)
        if int(n_stages) < 1:
            raise ValueError(f"n_stages must be >= 1, got {n_stages}.")
        if not (isinstance(self.stage, int | np.integer) and 0 <= self.stage < n_stages):
            raise ValueError(f"stage must be an integer in 0..{n_stages - 1}, got {self.stage!r}.")
        if self.baseline_pooling not in ("avg", "max"):
            raise ValueError(
                f"baseline_pooling must be 'avg' or 'max', got {self.baseline_pooling!r}."
            )
        if self.retrain not in ("scratch", "finetune"):
            raise ValueError(f"retrain must be 'scratch' or 'finetune', got {self.retrain!r}.")
        from .. import SeparabilityPooling

        # alpha, norm and n_components are the estimator's: check them before any training.
        SeparabilityPooling(
            alpha=self.alpha, norm=self.norm, n_components=self.n_components
        )._validate_params()


def _check_labels(y, n_samples, n_classes=None) -> np.ndarray:
    if y is None:
        raise ValueError("y is required: integer class indices of the images.")
    labels = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    if labels.ndim != 1 or len(labels) != n_samples:
        raise ValueError(
            f"y must be 1-D with one label per image: got shape {labels.shape} for "
            f"{n_samples} images."
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(
            f"y must hold integer class indices 0..n_classes-1 (skorch's convention), got "
            f"dtype {labels.dtype}; encode labels with sklearn.preprocessing.LabelEncoder."
        )
    if len(labels) and (
        labels.min() < 0 or (n_classes is not None and labels.max() >= n_classes)
    ):
        bound = "n_classes-1" if n_classes is None else str(n_classes - 1)
        raise ValueError(
            f"y must hold class indices 0..{bound}, got labels from {labels.min()} to "
            f"{labels.max()}; set module__n_classes to the number of classes, or encode labels "
            "with sklearn.preprocessing.LabelEncoder."
        )
    return labels.astype(np.int64, copy=False)


@torch.no_grad()
def _stage_maps(module, X, stage, batch_size, device) -> np.ndarray:
    """The stage's feature maps of all images, batch by batch: (n, C, H, W) float32."""
    module.eval()
    images = torch.as_tensor(X)
    outputs = [
        module.stage_maps(images[start : start + batch_size].to(device), stage).cpu()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(outputs).numpy()


def _load_matching_weights(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Copy every parameter/buffer of ``source`` whose name and shape exist in ``target``."""
    target_state = target.state_dict()
    matching = {
        name: value
        for name, value in source.state_dict().items()
        if name in target_state and target_state[name].shape == value.shape
    }
    target.load_state_dict(matching, strict=False)
