"""Birodkar et al.'s procedure as a classifier: train, fit the operator, swap, retrain."""

from __future__ import annotations

import copy
import inspect
from numbers import Integral

import numpy as np
import torch

from ..nn._fit_pooling import check_point, fit_point, replace_point
from ._skorch import PoolingCNNClassifier, check_images, check_labels
from .cnn import PoolingCNN

#: Parameters of SeparabilityPooling the procedure sets itself: the output grid comes from the
#: point's own downsampling, the input grid from the maps, the device from the net.
_SET_BY_PROCEDURE = ("stride", "output_shape", "grid_shape", "device")


def _separability_pooling():
    from .. import SeparabilityPooling  # the estimator layer sits beside the models

    return SeparabilityPooling


class SeparabilityPoolingClassifier(PoolingCNNClassifier):
    """Birodkar et al.'s procedure: a network whose pooling at one or more downsampling points
    is learned in closed form, one point after the other.

    For each point in ``stage`` (or ``points``, any network's module names), in the order
    given: (1) train the network, with ``baseline_pooling`` at the points not yet learned;
    (2) take that point's feature maps on the training images (at most
    ``max_samples_per_class`` per class, streamed batch by batch through a forward hook);
    (3) fit :class:`~skpool.SeparabilityPooling` on them (that point's ``alpha``, ``norm``,
    ``n_components``; the output grid is the one the point's pooling produced);
    (4) swap the fitted operator in (by the point's module name, as
    :func:`skpool.nn.fit_pooling` does). The last network, with every point learned, is trained
    from scratch (the paper) or from the previous network's weights (``retrain="finetune"``)
    and is the classifier. The paper's CIFAR-10 ResNet: ``stage=(2, 0), alpha=(15, 65),
    norm=("l2", "l1")`` with ``module=ResNet18``.

    The swapped-in layer applies the fitted operator P alone: the channel statistics of the
    fit describe the previous network's channels, not the retrained ones. With k components the
    point's convolution gives ``out/k`` channels, so the network keeps its strided widths.
    Every step depends on the parameters, so each GridSearchCV candidate refits all of them.

    Parameters
    ----------
    stage : int or sequence of int, default=0
        The downsampling points that get the learned pooling, in the order they are learned
        (0 = the first, at full resolution).
    points : str or sequence of str, default=None
        Any network: the module names (as in ``module.named_modules()``) of the points to
        learn, in that order, in place of ``stage``; ``module`` is then any torch module class
        (its arguments as ``module__<name>``). A point is a pooling module (``MaxPool2d``,
        ``AvgPool2d``, their adaptive forms, an ``Identity`` placeholder; ``n_components=1``
        there, which keeps the widths) or a strided ``Conv2d`` (the network's own module is the
        baseline; the learned network has a convolution of ``out/k`` channels at stride 1, then
        the operator). The maps and the swap are :func:`skpool.nn.fit_pooling`'s
        (:func:`~skpool.nn._fit_pooling.fit_point`, ``replace_point``); ``baseline_pooling``
        does not apply.
    alpha, norm, n_components : one value or one per stage, default=1.0, "l2", 2
        :class:`~skpool.SeparabilityPooling`'s parameters for each point (k = 2 components by
        default, the paper's choice).
    baseline_pooling : {"avg", "max"}, default="avg"
        The points' pooling while their feature maps are learned.
    retrain : {"scratch", "finetune"}, default="scratch"
    max_samples_per_class : int or None, default=10000
        At most this many training images per class (drawn with ``random_state``) feed each
        operator fit, as in the paper; None uses them all.
    separability__<name>
        Any other parameter of :class:`~skpool.SeparabilityPooling` (e.g.
        ``separability__support_radius``, ``separability__dtype``) except those the procedure
        sets (stride, output_shape, grid_shape, device), for every point.
    **kwargs
        As in :class:`PoolingCNNClassifier` (``module__stage_pooling`` sets the other points,
        "strided" by default).

    Attributes
    ----------
    separability_poolings_ : list of SeparabilityPooling
        The operators, in the order of ``stage``.
    intermediate_nets_ : list of PoolingCNNClassifier
        The network trained before each swap; ``baseline_net_`` is the first.
    separability_pooling_, stage_maps_shape_
        The first point's operator and the (C, H, W) of its maps.

    Examples
    --------
    >>> import numpy as np
    >>> from skpool.models import SeparabilityPoolingClassifier
    >>> rng = np.random.default_rng(0)
    >>> images, labels = rng.random((60, 8, 8), dtype=np.float32), np.arange(60) % 3
    >>> net = SeparabilityPoolingClassifier(
    ...     stage=(1, 0), alpha=(15.0, 65.0), norm=("l2", "l1"), module__width=4,
    ...     module__n_stages=2, max_epochs=1, random_state=0, device="cpu",
    ... ).fit(images, labels)
    >>> [est.operator_.shape for est in net.separability_poolings_]
    [(2, 4, 16), (2, 16, 64)]
    """

    prefixes_ = [*PoolingCNNClassifier.prefixes_, "separability"]

    def __init__(
        self,
        module=PoolingCNN,
        *,
        stage=0,
        points=None,
        alpha=1.0,
        norm="l2",
        n_components=2,
        baseline_pooling="avg",
        retrain="scratch",
        max_samples_per_class=10_000,
        **kwargs,
    ):
        super().__init__(module, **kwargs)
        self.stage = stage
        self.points = points
        self.alpha = alpha
        self.norm = norm
        self.n_components = n_components
        self.baseline_pooling = baseline_pooling
        self.retrain = retrain
        self.max_samples_per_class = max_samples_per_class

    def fit(self, X, y=None, **fit_params):
        X = check_images(X)
        labels = check_labels(y, len(X))
        if len(np.unique(labels)) < 2:
            raise ValueError(
                "SeparabilityPoolingClassifier needs at least two classes in y (separability "
                f"is between classes), got {np.unique(labels).tolist()}."
            )
        plan = self._plan(X, labels)
        layers, nets, poolings, shapes = {}, [], [], []
        for name, estimator_params in zip(plan.names, plan.estimator_params):
            module_args = {f"module__{k}": v for k, v in plan.module_args(layers).items()}
            net = _NetWithLayers(**{**plan.net_params, **module_args})
            net.preset_layers_ = dict(layers)
            net.warm_module_ = nets[-1].module_ if nets and self.retrain == "finetune" else None
            net.fit(X, labels, **fit_params)
            estimator = _separability_pooling()(**estimator_params, device=net.device)
            batches = _TrainingBatches(net, X, labels, self._capped_indices(labels))
            # the operator alone: the fit's channel statistics describe this net's channels
            layers[name] = fit_point(net.module_, name, estimator, batches, net.device,
                                     channel_statistics=False)
            nets.append(net)
            poolings.append(estimator)
            shapes.append((estimator.n_channels_in_, *estimator.grid_shape_))
        self.separability_poolings_ = poolings
        self.separability_pooling_ = poolings[0]
        self.intermediate_nets_ = nets
        self.baseline_net_ = nets[0]
        self.stage_maps_shape_ = shapes[0]
        self.stage_layers_ = layers
        self._final_module_args_ = plan.module_args(layers)
        return super().fit(X, labels, **fit_params)

    def initialize_module(self):
        if not hasattr(self, "stage_layers_"):
            raise RuntimeError(
                "SeparabilityPoolingClassifier builds its module in fit (after fitting the "
                "operators); call fit first."
            )
        params = {**self.module_params(), **self._final_module_args_}
        warm = self.intermediate_nets_[-1].module_ if self.retrain == "finetune" else None
        self.module_ = _build_with_layers(self.module, params, self.stage_layers_, warm)
        return self

    def set_params(self, **params):
        # separability__ parameters are read by the next fit; skorch would try to re-initialise
        # a component of that name.
        own = {key: params.pop(key) for key in list(params) if key.startswith("separability__")}
        for key, value in own.items():
            setattr(self, key, value)
            self._params_to_validate.add(key)
        return super().set_params(**params) if params else self

    # -- the plan: every parameter checked before any training ---------------------------------
    def _plan(self, X, labels) -> _Plan:
        if isinstance(self.module, torch.nn.Module):
            raise TypeError(
                "SeparabilityPoolingClassifier builds a new network for every stage: give the "
                f"module class ({type(self.module).__name__}) and its arguments as module__<name>,"
                " not an instance."
            )
        probe = PoolingCNNClassifier(**self._net_params())
        probe._learn_data(X, labels)
        module = probe.initialized_instance(probe.module, probe.module_params())
        if self.points is None:
            n_points = len(_stage_pooling(module))
            stages = _stages(self.stage, n_points)
            names = [_module_name(module, module.pools[point]) for point in stages]
        else:
            names = _points(self.points, module)
        per_stage = {name: _per_stage(name, getattr(self, name), len(names))
                     for name in _per_stage_names(type(self))}
        estimator_params = [
            {**self._separability_params(), **{name: values[i] for name, values in
                                               per_stage.items()}}
            for i in range(len(names))
        ]
        for params in estimator_params:  # SeparabilityPooling checks its own parameters
            _separability_pooling()(**params)._validate_params()
        if self.baseline_pooling not in ("avg", "max"):
            raise ValueError(
                f"baseline_pooling must be 'avg' or 'max', got {self.baseline_pooling!r}."
            )
        if self.retrain not in ("scratch", "finetune"):
            raise ValueError(f"retrain must be 'scratch' or 'finetune', got {self.retrain!r}.")
        cap = self.max_samples_per_class
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, Integral)
                                or cap < 1):
            raise ValueError(f"max_samples_per_class must be an int >= 1 or None, got {cap!r}.")
        if self.points is not None:  # any network: its own modules at the points
            for name, params in zip(names, estimator_params):
                check_point(name, module.get_submodule(name), _separability_pooling()(**params),
                            width_true=True)
            return _Plan(names, estimator_params, self._net_params())
        others = [p for i, p in enumerate(module.stage_pooling) if i not in stages]
        if "separability" in others:
            raise ValueError(
                "module__stage_pooling has 'separability' at a point not in stage; list every "
                f"separability point in stage (got stage={self.stage!r})."
            )
        components = list(module.n_components)
        for point, params in zip(stages, estimator_params):
            components[point] = params["n_components"]
        return _Plan(names, estimator_params, self._net_params(),
                     _StagedArgs(stages, names, list(module.stage_pooling), tuple(components),
                                 self.baseline_pooling))

    def _net_params(self) -> dict:
        """This classifier's parameters that a plain PoolingCNNClassifier takes."""
        procedure = _own_parameter_names(type(self))
        return {
            name: value
            for name, value in self.get_params(deep=False).items()
            if name not in procedure
            and not name.startswith(("separability__", "_"))  # skorch's own bookkeeping
        }

    def _separability_params(self) -> dict:
        params = self.get_params_for("separability")
        allowed = _passed_through_names(type(self))
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ValueError(
                f"separability__{unknown[0]} is not a SeparabilityPooling parameter the "
                f"procedure passes on; those are {sorted(allowed)} (alpha, norm and n_components "
                "are this classifier's own, per stage)."
            )
        return params

    def _capped_indices(self, labels) -> np.ndarray:
        cap = self.max_samples_per_class
        if cap is None:
            return np.arange(len(labels))
        rng = np.random.default_rng(self.random_state)
        chosen = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            chosen.append(members if len(members) <= cap else rng.choice(members, cap, False))
        return np.sort(np.concatenate(chosen))


class _Plan:
    """The checked parameters of one fit: the points (module names) in order, each point's
    SeparabilityPooling parameters, and how each network of the sequence is built."""

    def __init__(self, names, estimator_params, net_params, staged=None):
        self.names = names
        self.estimator_params = estimator_params
        self.net_params = net_params
        self._staged = staged

    def module_args(self, layers) -> dict:
        """The module arguments of the network with ``layers`` (name -> layer) learned: none
        for a user's network (its points are swapped), and for skpool's networks the stage
        poolings and components, the points not learned yet at the baseline pooling."""
        return {} if self._staged is None else self._staged.module_args(layers)


class _StagedArgs:
    """skpool's networks (PoolingCNN, ResNet18): a learned point is built as "separability"
    (its convolution gives out/k channels, a placeholder pooling to swap), the others of the
    plan as the baseline pooling."""

    def __init__(self, stages, names, poolings, components, baseline):
        self._points = dict(zip(names, stages))
        self._poolings = poolings
        self._components = components
        self._baseline = baseline

    def module_args(self, layers) -> dict:
        poolings = list(self._poolings)
        for name, point in self._points.items():
            poolings[point] = "separability" if name in layers else self._baseline
        return {"stage_pooling": tuple(poolings), "n_components": self._components}


class _NetWithLayers(PoolingCNNClassifier):
    """A PoolingCNNClassifier whose module gets fitted separability layers when it is built
    (``preset_layers_``), and optionally the weights of a previous network (``warm_module_``)."""

    def initialize_module(self):
        self.module_ = _build_with_layers(
            self.module, self.module_params(), self.preset_layers_, self.warm_module_
        )
        return self


class _TrainingBatches:
    """A function starting a pass over ``(images, class indices)`` batches of the training
    images a point's fit reads (``indices``): indexed batch by batch, never copied whole."""

    def __init__(self, net, X, labels, indices):
        self.batch_size = net.batch_size
        self.images = X
        self.indices = indices
        self.codes = net.label_encoder_.transform(labels[indices])

    def __call__(self):
        for start in range(0, len(self.indices), self.batch_size):
            batch = self.indices[start : start + self.batch_size]
            yield torch.as_tensor(self.images[batch]), self.codes[start : start + self.batch_size]


def _build_with_layers(module_class, params, layers, warm_module):
    """A new module with ``layers`` (name -> fitted layer) swapped in at their points, as
    :func:`skpool.nn.fit_pooling` swaps them (a strided convolution point gets a new
    convolution of out/k channels before the operator: the network is retrained)."""
    module = module_class(**params)
    for name, layer in layers.items():
        replace_point(module, name, copy.deepcopy(layer), width_true=True)
    if warm_module is not None:
        _load_matching_weights(module, warm_module)
    return module


def _load_matching_weights(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Copy every parameter/buffer of ``source`` whose name and shape exist in ``target``."""
    target_state = target.state_dict()
    matching = {
        name: value
        for name, value in source.state_dict().items()
        if name in target_state and target_state[name].shape == value.shape
    }
    target.load_state_dict(matching, strict=False)


def _own_parameter_names(cls) -> set[str]:
    """The procedure's parameters: those of ``cls.__init__`` that PoolingCNNClassifier lacks."""
    return _init_names(cls) - _init_names(PoolingCNNClassifier)


def _per_stage_names(cls) -> tuple[str, ...]:
    """The procedure's parameters that are SeparabilityPooling's, given one per stage."""
    estimator = set(_separability_pooling()().get_params())
    return tuple(name for name in sorted(_own_parameter_names(cls)) if name in estimator)


def _passed_through_names(cls) -> set[str]:
    estimator = set(_separability_pooling()().get_params())
    return estimator - set(_SET_BY_PROCEDURE) - set(_per_stage_names(cls))


def _init_names(cls) -> set[str]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}


def _stage_pooling(module) -> tuple:
    stage_pooling = getattr(module, "stage_pooling", None)
    if stage_pooling is None:
        raise ValueError(
            f"{type(module).__name__} has no stage_pooling (skpool's PoolingCNN and ResNet18 "
            "have): name its downsampling points with points=[module names]."
        )
    return stage_pooling


def _module_name(module, target) -> str:
    return next(name for name, sub in module.named_modules() if sub is target)


def _points(points, module) -> list[str]:
    names = [points] if isinstance(points, str) else list(points)
    modules = dict(module.named_modules())
    if not names or any(not isinstance(n, str) or n not in modules or not n for n in names):
        raise ValueError(
            f"points must be a module name of the network or a sequence of them (names as in "
            f"module.named_modules()), got {points!r}."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"points lists a module twice: {points!r}.")
    return names


def _stages(stage, n_points) -> list[int]:
    stages = list(stage) if isinstance(stage, list | tuple | np.ndarray) else [stage]
    valid = all(isinstance(s, Integral) and not isinstance(s, bool) for s in stages)
    if not stages or not valid or any(not 0 <= s < n_points for s in stages):
        raise ValueError(
            f"stage must be an integer in 0..{n_points - 1}, got {stage!r} (or a sequence of "
            "distinct such integers, the points in the order they are learned)."
        )
    if len(set(stages)) != len(stages):
        raise ValueError(f"stage lists a point twice: {stage!r}.")
    return [int(s) for s in stages]


def _per_stage(name, value, n_stages) -> list:
    if isinstance(value, list | tuple | np.ndarray):
        if len(value) != n_stages:
            raise ValueError(
                f"{name} must be one value or one per stage ({n_stages}), got {value!r}."
            )
        return list(value)
    return [value] * n_stages

