"""skpool._parameters is the one source of the estimators' parameter names, defaults and string
choices: the estimators' signatures read their defaults from it (not copies of the same values),
their constraints its choices, their docstrings state the same defaults, and the command line
builds its options from it (tests/cli/test_cli.py)."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap

import pytest
from sklearn.utils._param_validation import StrOptions

from skpool import GeneralizedMaxPooling, SeparabilityPooling, _parameters

ESTIMATORS = [
    (SeparabilityPooling, _parameters.SEPARABILITY_POOLING,
     _parameters.SEPARABILITY_POOLING_CHOICES),
    (GeneralizedMaxPooling, _parameters.GENERALIZED_MAX_POOLING,
     _parameters.GENERALIZED_MAX_POOLING_CHOICES),
]
IDS = [estimator.__name__ for estimator, _, _ in ESTIMATORS]


@pytest.mark.parametrize("estimator, record, choices", ESTIMATORS, ids=IDS)
def test_the_signature_is_the_record(estimator, record, choices):
    parameters = list(inspect.signature(estimator).parameters.values())
    assert [p.name for p in parameters] == list(record._fields)
    for parameter in parameters:
        assert parameter.default == getattr(record, parameter.name), parameter.name
    assert estimator().get_params() == record._asdict()


@pytest.mark.parametrize("estimator, record, choices", ESTIMATORS, ids=IDS)
def test_every_default_in_the_source_is_read_from_the_record(estimator, record, choices):
    """Equal values could be copies; the source must say ``name=_DEFAULTS.name``."""
    assert inspect.getmodule(estimator)._DEFAULTS is record
    source = textwrap.dedent(inspect.getsource(estimator.__init__))
    arguments = ast.parse(source).body[0].args
    positional = arguments.posonlyargs + arguments.args
    pairs = list(zip(positional[len(positional) - len(arguments.defaults):],
                     arguments.defaults))
    pairs += list(zip(arguments.kwonlyargs, arguments.kw_defaults))
    assert [argument.arg for argument, _ in pairs] == list(record._fields)
    for argument, default in pairs:
        written = ast.unparse(default) if default is not None else "no default"
        assert written == f"_DEFAULTS.{argument.arg}", f"{argument.arg}={written}"


@pytest.mark.parametrize("estimator, record, choices", ESTIMATORS, ids=IDS)
def test_the_string_parameters_choices_are_the_constraints(estimator, record, choices):
    """Every parameter constrained to a few strings has its choices in the record's module,
    the same set, its default among them."""
    constrained = {
        name: constraint.options
        for name, constraints in estimator._parameter_constraints.items()
        for constraint in constraints
        if isinstance(constraint, StrOptions)
    }
    assert set(constrained) == set(choices)
    for name, values in choices.items():
        assert set(values) == constrained[name] and len(set(values)) == len(values), name
        assert values[0] == getattr(record, name), f"{name}: the default is listed first"


def test_the_precisions_are_the_fit_protocols():
    from skpool._core.fit import DTYPES

    assert set(_parameters.SEPARABILITY_POOLING_CHOICES["dtype"]) == set(DTYPES)


@pytest.mark.parametrize("estimator, record, choices", ESTIMATORS, ids=IDS)
def test_the_docstring_states_the_defaults(estimator, record, choices):
    documented = dict(re.findall(r"^    (\w+) : .*, default=(.+)$", estimator.__doc__, re.M))
    assert set(documented) == set(record._fields)
    for name, text in documented.items():
        assert ast.literal_eval(text) == getattr(record, name), f"{name}: default={text}"


def test_the_classifier_sets_only_parameters_the_estimator_has():
    """The procedure's own list of the SeparabilityPooling parameters it sets (the rest is
    derived from the signatures): a renamed parameter would otherwise pass through unnoticed."""
    from skpool.models._procedure import _SET_BY_PROCEDURE

    assert set(_SET_BY_PROCEDURE) <= set(_parameters.SEPARABILITY_POOLING._fields)
