"""The skorch classifier of the deep models, its input gate and its label encoding."""

from __future__ import annotations

import copy
import functools
import inspect
import math
from fnmatch import fnmatch
from numbers import Real

import numpy as np
import torch
from skorch import NeuralNetClassifier
from skorch.dataset import Dataset
from skorch.utils import is_dataset
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets

from .._device import resolve_device
from .._parameters import MAX_SEED, check_integer
from .cnn import PoolingCNN

#: The parameters of λ (``GeneralizedMaxPool2d.log_lam``), as a skorch param-group pattern.
LAM_PARAMETERS = "*log_lam"


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
    if images.ndim >= 1 and images.shape[0] == 0:
        raise ValueError(
            f"Found 0 images: X is empty (shape {tuple(images.shape)}); give at least one "
            "(n, H, W) or (n, C, H, W) image."
        )
    if images.ndim not in (3, 4):
        raise ValueError(
            "Images must have shape (n, H, W) or (n, C, H, W) (channels first); got "
            f"{images.ndim}-D input of shape {tuple(images.shape)}. Reshape flat digits with "
            "X.reshape(-1, 8, 8)."
        )
    if not finite:
        raise ValueError("Input images contain NaN or infinity.")
    return images


def keeps_fit_on_failure(method):
    """Decorate ``fit``/``partial_fit`` of a skorch net so that an exception (bad input, a
    bad parameter, a fault or an interrupt during training) leaves the net as it was before
    the call: its attributes as they were, and the weights, optimizer state and history of
    the objects trained in place (``warm_start``, ``partial_fit``, a module instance) restored
    from copies of their state dicts taken at the start."""
    if getattr(method, "keeps_fit_on_failure", False):
        return method

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.__dict__.get("_fit_guard_"):  # a nested call: the outer one restores
            return method(self, *args, **kwargs)
        saved = dict(self.__dict__)
        states, history = {}, None
        if saved.get("initialized_"):
            for name in ("module_", "criterion_", "optimizer_"):
                if hasattr(saved.get(name), "state_dict"):
                    states[name] = copy.deepcopy(saved[name].state_dict())
            if saved.get("history_") is not None:
                history = copy.deepcopy(list(saved["history_"]))
        self._fit_guard_ = True
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            for name, state in states.items():
                self.__dict__[name].load_state_dict(state)
            if history is not None:
                self.history_[:] = history
            raise
        finally:
            self.__dict__.pop("_fit_guard_", None)

    wrapper.keeps_fit_on_failure = True
    return wrapper


def seed_torch(random_state) -> None:
    """Seed torch with ``random_state`` (None: leave it), an integer in [0, 2**64 - 1] (the
    range torch's generator takes; a ValueError naming it otherwise)."""
    if random_state is not None:
        torch.manual_seed(check_integer("random_state", random_state, 0, MAX_SEED))


def check_labels(y, n_samples: int) -> np.ndarray:
    """Validate class labels as scikit-learn classifiers take them: one per image, any
    hashable classification targets (strings, integers, integral floats)."""
    if y is None:
        raise ValueError("y is required: one class label per image.")
    labels = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    if labels.ndim != 1 or len(labels) != n_samples:
        raise ValueError(
            f"y must be 1-D with one label per image: got shape {labels.shape} for "
            f"{n_samples} images."
        )
    check_classification_targets(labels)
    return labels


class PoolingCNNClassifier(NeuralNetClassifier):
    """A pooling network (:class:`~skpool.models.PoolingCNN` by default, or
    :class:`~skpool.models.ResNet18`) as a scikit-learn classifier (skorch).

    Labels are whatever scikit-learn classifiers take (strings, any integers): ``fit`` encodes
    them with :class:`~sklearn.preprocessing.LabelEncoder`, ``classes_`` lists them sorted,
    ``predict_proba``'s columns follow ``classes_`` and ``predict`` returns the original labels.
    Inside the training loop the network works with class indices (the index in ``classes_``):
    skorch's callbacks see indices as targets and from ``predict``, so their scores (e.g.
    ``valid_acc``) are right for any labels.
    The module's ``n_classes``, ``in_channels`` and ``input_size`` are taken from the training
    data unless set with ``module__<name>`` (``inferred_module_params_`` shows what was taken).

    Parameters
    ----------
    module : torch module class, default=PoolingCNN
        Its constructor arguments are set with ``module__<name>`` (e.g. ``module__width``,
        ``module__stage_pooling``, ``module__global_pool``, ``module__lam``); any keyword of
        the global pooling layer goes through ``module__global_pool_options``.
    random_state : int or None, default=None
        Seeds torch before the module is built and trained: the same seed gives the same
        network on CPU.
    device : {"auto", "cpu", "cuda", "cuda:<index>"}, default="auto"
        Resolved in ``initialize``: "auto" becomes "cuda" when available, else "cpu", and the
        resolved name is what ``device`` holds afterwards (skorch moves tensors with it).
        Requesting CUDA without CUDA raises ValueError.
    classes : array-like or None, default=None
        All class labels, when the training labels may lack some (skorch's parameter).
    criterion, optimizer, lr, max_epochs, batch_size, train_split, verbose, **kwargs
        As in :class:`skorch.NeuralNetClassifier`; the defaults suit small image sets
        (cross-entropy on logits, Adam at 1e-3 with weight decay 5e-4
        (``optimizer__weight_decay``), 10 epochs, batches of 32, no internal validation
        split). Measured on ``make_svhn_like(n_train=3000, n_test=500)``, width 16, 8 epochs,
        seeds 0–2, standardised input: batches of 64 without weight decay 36.0 / 40.2% test
        error (seeds 0, 1), batches of 32 30.2 / 34.2 / 33.0%, with weight decay
        28.4 / 33.2 / 30.0% (issue 24). The networks standardise each image themselves
        (``module__standardize=True``), so raw [0, 1] images are the input.

    A ``fit`` or ``partial_fit`` that fails (bad input, a bad parameter, an error or an
    interrupt during training) leaves the net as it was: the previous fit's classes, weights,
    optimizer state and history (subclasses' ``fit`` too).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels, sorted; column j of ``predict_proba`` is ``classes_[j]``.
    label_encoder_ : LabelEncoder
        Maps the labels to the class indices the module's outputs use.
    inferred_module_params_ : dict
        The module arguments taken from the training data (those not set explicitly).

    Examples
    --------
    >>> import numpy as np
    >>> from skpool.models import PoolingCNNClassifier, ResNet18
    >>> rng = np.random.default_rng(0)
    >>> images, labels = rng.random((40, 8, 8), dtype=np.float32), np.repeat(["a", "b"], 20)
    >>> net = PoolingCNNClassifier(module__width=4, module__n_stages=2, max_epochs=1,
    ...                            random_state=0, device="cpu").fit(images, labels)
    >>> net.classes_, net.predict_proba(images).shape, set(net.predict(images)) <= {"a", "b"}
    (array(['a', 'b'], dtype='<U1'), (40, 2), True)
    >>> resnet = PoolingCNNClassifier(ResNet18, module__width_multiplier=1 / 16, max_epochs=1,
    ...                               device="cpu").fit(images, labels)
    >>> resnet.inferred_module_params_
    {'n_classes': 2, 'in_channels': 1, 'input_size': (8, 8)}
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
        batch_size=32,
        train_split=None,
        verbose=0,
        device="auto",
        **kwargs,
    ):
        kwargs.setdefault("optimizer__weight_decay", 5e-4)
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

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("fit", "partial_fit"):  # a subclass's own fit is atomic as well
            if name in cls.__dict__:
                setattr(cls, name, keeps_fit_on_failure(cls.__dict__[name]))

    # -- training ------------------------------------------------------------------------------
    def initialize(self):
        self.device = str(resolve_device(self.device))
        seed_torch(self.random_state)
        return super().initialize()

    @keeps_fit_on_failure
    def fit(self, X, y=None, **fit_params):
        X = check_images(X)
        if not (self.warm_start and self.initialized_):
            self._learn_data(X, y)
        return super().fit(X, y, **fit_params)

    @keeps_fit_on_failure
    def partial_fit(self, X, y=None, classes=None, **fit_params):
        X = check_images(X)
        if "label_encoder_" not in self.__dict__:  # not fitted with labels before
            self._learn_data(X, y, classes)
        return super().partial_fit(X, y, classes=classes, **fit_params)

    def _learn_data(self, X, y, classes=None) -> None:
        """Fit the label encoding and note the module arguments the data determine (at least
        two classes, among the labels or in ``classes``: a classifier of one class learns
        nothing, and scikit-learn's classifiers refuse it too)."""
        if is_dataset(X) or y is None:  # the targets are in a Dataset: used as they are
            for name in ("label_encoder_", "inferred_module_params_"):
                self.__dict__.pop(name, None)
            return
        labels = check_labels(y, len(X))
        if classes is None:
            classes = self.classes
        known = classes is not None and len(classes) > 0
        encoder = LabelEncoder().fit(np.asarray(classes) if known else labels)
        if len(encoder.classes_) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least two classes; got only "
                f"{encoder.classes_.tolist()}. List every class with classes=[...] when a "
                "batch holds only one."
            )
        self.label_encoder_ = encoder
        self.inferred_module_params_ = {
            "n_classes": len(encoder.classes_),
            "in_channels": 1 if X.ndim == 3 else int(X.shape[1]),
            "input_size": tuple(int(v) for v in X.shape[-2:]),
        }

    def get_dataset(self, X, y=None):
        X = check_images(X)
        encoder = getattr(self, "label_encoder_", None)
        if y is None or is_dataset(X) or encoder is None:
            return super().get_dataset(X, y)
        labels = check_labels(y, len(X))
        unseen = np.setdiff1d(labels, encoder.classes_)
        if len(unseen):
            raise ValueError(
                f"y contains labels the classifier was not fitted with: {unseen.tolist()[:10]} "
                f"(classes_ are {encoder.classes_.tolist()[:10]})."
            )
        return super().get_dataset(X, encoder.transform(labels).astype(np.int64))

    def fit_loop(self, X, y=None, epochs=None, **fit_params):
        # Inside the loop, skorch's scoring callbacks compare predict() with the targets of the
        # datasets, which are class indices: predict returns indices there too.
        self.in_fit_loop_ = True
        try:
            return super().fit_loop(X, y, epochs=epochs, **fit_params)
        finally:
            del self.in_fit_loop_

    # -- the module ----------------------------------------------------------------------------
    def initialize_module(self):
        self.module_ = self.initialized_instance(self.module, self.module_params())
        return self

    def module_params(self) -> dict:
        """The module's arguments: the ``module__<name>`` parameters, and from the training
        data ``n_classes``, ``in_channels`` and ``input_size`` where the module takes them and
        they are not set."""
        params = self.get_params_for("module")
        if isinstance(self.module, torch.nn.Module):  # an instance: used as it is
            return params
        inferred = getattr(self, "inferred_module_params_", {})
        accepted = _parameter_names(self.module)
        for name, value in inferred.items():
            if name in accepted and name not in params:
                params[name] = value
        n_classes = inferred.get("n_classes")
        if n_classes is not None and params.get("n_classes", n_classes) != n_classes:
            raise ValueError(
                f"module__n_classes={params['n_classes']}, but there are {n_classes} classes "
                f"({self.classes_.tolist()[:10]}); leave module__n_classes unset (it is taken "
                "from the labels) or list every class with classes=[...]."
            )
        return params

    def _initialize_module(self, reason=None):
        # skorch words every refit's re-initialisation as "because the following parameters
        # were re-set: <all module__ parameters>" even when none was touched; say what happens.
        if reason is None and self.initialized_:
            reason = "Re-initializing module."
        return super()._initialize_module(reason=reason)

    # -- prediction ----------------------------------------------------------------------------
    @property
    def classes_(self):
        encoder = self.__dict__.get("label_encoder_")
        return encoder.classes_ if encoder is not None else super().classes_

    def predict(self, X):
        """The most probable class of each image, as one of ``classes_`` (during ``fit``, for
        skorch's callbacks, its index in ``classes_``)."""
        indices = self.predict_proba(X).argmax(axis=1)
        encoder = self.__dict__.get("label_encoder_")
        if encoder is None or self.__dict__.get("in_fit_loop_"):
            return indices
        return encoder.classes_[indices]


class LamLearningRate:
    """``lam_lr_factor`` for a skorch net whose module has learnable GMP λ = exp(θ): the
    parameters named ``*log_lam`` get the learning rate ``lr * lam_lr_factor``, the others
    ``lr``. Shared by :class:`DGMPClassifier` and the embedders of
    :mod:`skpool.models.retrieval`; the net stores ``lam_lr_factor`` in its ``__init__``."""

    def get_params_for(self, prefix):
        params = super().get_params_for(prefix)
        if prefix == "optimizer":
            factor = self.lam_lr_factor
            if not (isinstance(factor, Real) and math.isfinite(factor) and factor >= 0):
                raise ValueError(f"lam_lr_factor must be a finite number >= 0, got {factor!r}.")
            lr = params.get("lr", self.lr)
            groups = list(params.get("param_groups", []))
            params["param_groups"] = [*groups, (LAM_PARAMETERS, {"lr": lr * factor})]
        return params

    def set_params(self, **kwargs):
        super().set_params(**kwargs)
        changed = {"lr", "optimizer__lr", "lam_lr_factor"} & kwargs.keys()
        if changed and getattr(self, "initialized_", False):
            # skorch sets a new lr on every group (a virtual parameter): restore λ's factor.
            # optimizer__lr is virtual (not stored) on an initialised net: take it from kwargs.
            lr = kwargs.get("optimizer__lr", kwargs.get("lr"))
            if lr is None:
                lr = self.get_params_for("optimizer").get("lr", self.lr)
            lam_ids = {
                id(param)
                for name, param in self.get_all_learnable_params()
                if fnmatch(name, LAM_PARAMETERS)
            }
            for group in self.optimizer_.param_groups:
                if all(id(param) in lam_ids for param in group["params"]):
                    group["lr"] = lr * self.lam_lr_factor
        return self


class DGMPClassifier(LamLearningRate, PoolingCNNClassifier):
    """A pooling network with a Deep Generalized Max Pooling head (Christlein et al. 2019).

    The module's global pooling is a :class:`~skpool.nn.GeneralizedMaxPool2d` with a learnable
    λ = exp(θ); ``module__lam`` is its initial value and GridSearchCV tunes it like any
    parameter. Other keywords of the layer go through ``module__global_pool_options``.

    Parameters
    ----------
    module : torch module class, default=PoolingCNN
        :class:`~skpool.models.PoolingCNN` or :class:`~skpool.models.ResNet18` (any module
        taking ``global_pool``, ``lam`` and ``lam_scale``).
    module__global_pool : str, default="gmp"
    module__lam : float, default=1.0
        The initial λ.
    module__lam_scale : {"relative", "absolute"}, default="relative"
        "relative": λ in units of each sample's mean squared descriptor norm trace(ΦᵀΦ)/N
        (scale-free); "absolute": the papers' λ (Christlein et al.: λ₀ ∈ {1, 1e3, 1e5}).
        How the two compare on digits: ``benchmarks/README.md``.
    lam_lr_factor : float, default=1.0
        The learning rate of the learnable λ = exp(θ) (the parameters named ``*log_lam``) is
        ``lr * lam_lr_factor``, the other parameters' ``lr``: an extra group in skorch's
        ``optimizer__param_groups``, after any the user gives (the first matching pattern
        wins). ``set_params(lr=...)`` or ``set_params(lam_lr_factor=...)`` on an initialised
        net update the optimiser's groups in place. 0 freezes λ. Christlein et al. multiply
        λ's learning rate by 100 to 1000.
    **kwargs
        As in :class:`PoolingCNNClassifier`.

    Examples
    --------
    >>> from skpool.models import DGMPClassifier
    >>> params = DGMPClassifier().get_params()
    >>> params["module__lam"], params["module__global_pool"], params["lam_lr_factor"]
    (1.0, 'gmp', 1.0)
    """

    def __init__(
        self,
        module=PoolingCNN,
        *,
        lam_lr_factor=1.0,
        module__global_pool="gmp",
        module__lam=1.0,
        module__lam_scale="relative",
        **kwargs,
    ):
        super().__init__(
            module,
            module__global_pool=module__global_pool,
            module__lam=module__lam,
            module__lam_scale=module__lam_scale,
            **kwargs,
        )
        self.lam_lr_factor = lam_lr_factor


def _parameter_names(module_class) -> set[str]:
    try:
        return set(inspect.signature(module_class).parameters)
    except (TypeError, ValueError):  # no signature to read
        return set()
