"""The papers' tables re-measured in miniature on SVHN-like digits (nothing is downloaded).
========================================================================================

Birodkar et al., *A Closed-Form Learned Pooling for Deep Classification Networks* (2019), and
Christlein et al., *Deep Generalized Max Pooling* (ICDAR 2019), re-run with skpool's models on
:func:`skpool.datasets.make_svhn_like` (32×32 crops made from scikit-learn's digits; the
"reduced" set is the first 5% of the training set, as the paper's reduced SVHN):

- **Birodkar Table 1** — test error of the CNN and of ResNet-18 (CIFAR style, ``--resnet-width``
  times the paper's widths), reduced and full training set: strided convolutions at every
  downsampling point (the baseline) against the learned separability pooling at the chosen
  point (``--stage``; the others stay strided), with k = 2 components (the paper's choice).
  α and the norm are chosen once per architecture by cross-validation on the reduced training
  set (GridSearchCV over ``--alpha-grid`` × ``--norm-grid``, seed 0) and used for every seed
  and for both training sets.
- **Birodkar Tables 2–3** — the full-set models of Table 1 under the corruptions and
  perturbation sequences of :mod:`skpool.evaluation` (Hendrycks & Dietterich 2019): the
  learned pooling's corruption errors CE and flip rates FR relative to the strided baseline
  of the same architecture and seed, and their means over geometric and non-geometric ones.
- **Birodkar Table 4** — the pooling operator learned by SGD with the network at the same
  point (``"sgd"``, k = 2, from average pooling, no locality term), reduced and full.
- **Christlein Tables I–II** — retrieval: the CNN's trunk with a global average, max, mixed,
  log-sum-exp or DGMP head (λ₀ ∈ {1, 1e3, 1e5}, absolute as in the paper, λ learned with 1000×
  the learning rate), trained with the batch-hard triplet loss on P × K batches (AMSGrad, the
  paper's settings); mean average precision and top-1 of the test images querying each other,
  relevant = the same digit class (the paper's relevant items are the same *writer*, unseen
  in training; here the classes are shared and only the source digits are disjoint).
- **Christlein Table III** — classification accuracy of the CNN with a global average, max or
  DGMP head (λ₀ as above, 100× learning rate for λ); the average row is Table 1's full-set
  strided CNN (the same model).

Each table is printed next to the paper's own numbers where ``DESIGN.md`` lists them (SVHN and
CIFAR-10-C/P for Birodkar, ICDAR17 and CLaMM16 for Christlein: other data, other sizes; the
comparison is of direction, not of values), with the machine, the sizes and the run time.
Means ± standard deviations are over seeds: the data set is the same for every seed; the
networks' initialisation, batch order and the corruptions' random draws change.

Every result is a cell (table, model, seed), written to ``--out`` (JSON) as soon as it is
computed, atomically (a temporary file renamed over the old one); a rerun with the same
settings skips the cells already there, so an interrupted run resumes, and ``--seeds 5``
after ``--seeds 3`` adds two seeds. A file made with other settings is refused.

Departures from the papers, all forced by size: small widths and few epochs; Adam (lr 1e-3)
for every classifier (the paper trains ResNet-18 with SGD and step decay); one learned point,
by default the second (16×16 → 8×8: an operator for the first point's 32×32 grid takes tens
of seconds per fit on a small CPU, and cross-validation fits one per candidate and fold; the
paper's ResNet learns the third point, then the first); 32×32 grey SVHN-like digits instead
of SVHN, CIFAR-10(-C/-P), ICDAR17 and CLaMM16.

Quick (structure only: minutes on 2 CPU cores, run by the test suite):
    python examples/paper_tables.py --quick --out results/paper_tables_quick.json
Full sizes (hours on a CPU; use a GPU with --device cuda):
    python examples/paper_tables.py --out results/paper_tables_full.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

FORMAT = "skpool-paper-tables/1"

#: Sizes of the two modes; every key but ``seeds`` defines the cells (a results file made
#: with other values is refused).
QUICK = {
    "seeds": 1, "train_size": 1000, "test_size": 150, "sequences": 30, "epochs": 2,
    "reduced_epochs": 8, "width": 4, "resnet_width": 1 / 16, "stage": 1,
    "alpha_grid": [1.0, 65.0], "norm_grid": ["l1", "l2"], "cv": 2, "color": False,
}
FULL = {
    "seeds": 5, "train_size": 20000, "test_size": 5000, "sequences": 1000, "epochs": 30,
    "reduced_epochs": 200, "width": 64, "resnet_width": 1.0, "stage": 1,
    "alpha_grid": [1.0, 15.0, 65.0], "norm_grid": ["l1", "l2"], "cv": 3, "color": False,
}
SETTINGS = tuple(key for key in QUICK if key != "seeds")

ARCHITECTURES = ("cnn", "resnet")
REGIMES = ("reduced", "full")
DGMP_LAMBDAS = {"dgmp-lam1": 1.0, "dgmp-lam1e3": 1e3, "dgmp-lam1e5": 1e5}
RETRIEVAL_HEADS = ("avg", "max", "mixed", "lse", *DGMP_LAMBDAS)
CLASSIFICATION_HEADS = ("max", *DGMP_LAMBDAS)  # "avg" is Table 1's full-set strided CNN

#: The papers' figures (DESIGN.md): Birodkar Table 1 test error (%) on SVHN, Christlein
#: Table II mAP (%) on ICDAR17 and Table III accuracy (%) on CLaMM16.
PAPER_TABLE1 = {
    ("cnn", "reduced"): (32.53, 21.56), ("cnn", "full"): (10.68, 9.93),
    ("resnet", "reduced"): (12.38, 10.46),
}
PAPER_TABLE2_MAP = {"avg": 50.4, "max": 50.3, "mixed": 50.2, "lse": 51.4, "dgmp": 54.8}
PAPER_TABLE3_ACCURACY = {"avg": 85.9, "max": 85.5, "dgmp": 87.1}
PAPER_TABLE3_FLIPS = "geometric: 6 of 8 perturbations flip less with the learned pooling"


# ------------------------------------------------------------------------------ the cells


def planned_cells(seeds: int) -> list[tuple[str, str, int]]:
    """Every (table, model, seed), seed by seed, so that a partial run holds whole seeds."""
    cells = [("cv", arch, 0) for arch in ARCHITECTURES]
    for seed in range(seeds):
        for arch in ARCHITECTURES:
            for regime in REGIMES:
                for pooling in ("strided", "separability"):
                    cells.append(("birodkar1", f"{arch}/{regime}/{pooling}", seed))
                cells.append(("birodkar4", f"{arch}/{regime}/sgd", seed))
        cells += [("christlein12", head, seed) for head in RETRIEVAL_HEADS]
        cells += [("christlein3", head, seed) for head in CLASSIFICATION_HEADS]
    return cells


def compute_cell(table, model, seed, data, args, done) -> dict:
    """The measurements of one cell (``done``: the cells computed so far, for the CV choice)."""
    if table == "cv":
        return cross_validate(model, data, args)
    if table in ("birodkar1", "birodkar4"):
        arch, regime, pooling = model.split("/")
        chosen = done[("cv", arch, 0)]["best_params"] if pooling == "separability" else None
        X, y = data[regime]
        epochs = args.reduced_epochs if regime == "reduced" else args.epochs
        net = classifier(arch, pooling, seed, epochs, args, chosen).fit(X, y)
        result = {"test_error": test_error(net, data)}
        if table == "birodkar1" and regime == "full":
            result["robustness"] = robustness(net, data, args, seed)
        return result
    if table == "christlein12":
        return retrieval(model, seed, data, args)
    if table == "christlein3":
        net = global_head_classifier(model, seed, args).fit(*data["full"])
        return {"test_error": test_error(net, data), **learned_lambda(net)}
    raise ValueError(f"unknown table {table!r}")


def common_params(arch, seed, epochs, args) -> tuple[type, dict]:
    from skpool.models import PoolingCNN, ResNet18

    params = {"max_epochs": epochs, "random_state": seed, "device": args.device,
              "module__in_channels": args.channels}
    if arch == "cnn":
        return PoolingCNN, {**params, "module__width": args.width}
    return ResNet18, {**params, "module__width_multiplier": args.resnet_width}


def classifier(arch, pooling, seed, epochs, args, chosen=None):
    """Strided everywhere, or ``pooling`` at ``args.stage`` (separability: with ``chosen``)."""
    from skpool.models import PoolingCNNClassifier, SeparabilityPoolingClassifier

    module, params = common_params(arch, seed, epochs, args)
    if pooling == "separability":
        return SeparabilityPoolingClassifier(module, stage=args.stage, **(chosen or {}), **params)
    points = ["strided"] * 3  # the CNN's three stages; ResNet-18's three downsampling points
    if pooling != "strided":
        points[args.stage] = pooling
    return PoolingCNNClassifier(module, module__stage_pooling=tuple(points), **params)


def global_head_classifier(head, seed, args):
    from skpool.models import DGMPClassifier, PoolingCNNClassifier

    module, params = common_params("cnn", seed, args.epochs, args)
    if head in DGMP_LAMBDAS:
        return DGMPClassifier(module, module__lam=DGMP_LAMBDAS[head], module__lam_scale="absolute",
                              lam_lr_factor=100.0, **params)
    return PoolingCNNClassifier(module, module__global_pool=head, **params)


def cross_validate(arch, data, args) -> dict:
    """α and norm of the separability point by GridSearchCV on the reduced training set."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    grid = {"alpha": list(args.alpha_grid), "norm": list(args.norm_grid)}
    folds = StratifiedKFold(args.cv, shuffle=True, random_state=0)
    search = GridSearchCV(
        classifier(arch, "separability", 0, args.reduced_epochs, args), grid, cv=folds,
        refit=False, error_score="raise",
    )
    with warnings.catch_warnings():  # a class with fewer images than folds in a tiny set
        warnings.filterwarnings("ignore", message="The least populated class")
        search.fit(*data["reduced"])
    return {
        "best_params": {k: _plain(v) for k, v in search.best_params_.items()},
        "candidates": [{k: _plain(v) for k, v in p.items()} for p in search.cv_results_["params"]],
        "mean_accuracy": search.cv_results_["mean_test_score"].tolist(),
    }


def retrieval(head, seed, data, args) -> dict:
    from skpool.models import DGMPEmbedder, PoolingEmbedder
    from skpool.retrieval_metrics import mean_average_precision, top1_accuracy

    params = {"module__in_channels": args.channels, "module__width": args.width,
              "max_epochs": args.epochs, "random_state": seed, "device": args.device}
    if head in DGMP_LAMBDAS:
        embedder = DGMPEmbedder(module__lam=DGMP_LAMBDAS[head], module__lam_scale="absolute",
                                **params)
    else:
        embedder = PoolingEmbedder(module__global_pool=head, **params)
    embedder.fit(*data["full"])
    embeddings = embedder.transform(data["test"][0])
    labels = data["test"][1]
    return {
        "mAP": mean_average_precision(embeddings, labels),
        "top1": top1_accuracy(embeddings, labels),
        **learned_lambda(embedder),
    }


def learned_lambda(net) -> dict:
    pool = net.module_.global_pool
    return {"learned_lambda": float(pool.lam.detach())} if hasattr(pool, "lam") else {}


def test_error(net, data) -> float:
    X_test, y_test = data["test"]
    return float(np.mean(net.predict(X_test) != y_test))


def robustness(net, data, args, seed) -> dict:
    """E_{s,c} per corruption; FP per perturbation and the flip fraction at every step."""
    from skpool.evaluation import (
        NOISE_PERTURBATIONS,
        PERTURBATIONS,
        evaluate_corruptions,
        flip_probability,
        perturbation_predictions,
    )

    X_test, y_test = data["test"]
    errors = evaluate_corruptions(net, X_test, y_test, random_state=seed)
    flips, steps = {}, {}
    for name in PERTURBATIONS:
        predictions = perturbation_predictions(net, X_test[: args.sequences], name,
                                               random_state=seed)
        reference = "first" if name in NOISE_PERTURBATIONS else "previous"
        flips[name] = flip_probability(predictions, reference=reference)
        compared = predictions[:, :1] if reference == "first" else predictions[:, :-1]
        steps[name] = np.mean(predictions[:, 1:] != compared, axis=0).tolist()
    return {
        "corruption_errors": {name: values.tolist() for name, values in errors.items()},
        "flip_probability": flips,
        "flips_per_step": steps,
    }


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


# ------------------------------------------------------------------------------ the results file


class ResultsFile:
    """The JSON results: settings, one record per session, and the cells (table, model, seed)."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.record = {"format": FORMAT, "settings": settings, "sessions": [], "cells": []}
        if path.exists():
            try:
                stored = json.loads(path.read_text())
                valid = stored.get("format") == FORMAT and isinstance(stored.get("cells"), list)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
                raise ValueError(f"{path} is not a results file of this script: {error}") from None
            if not valid:
                raise ValueError(f"{path} is not a results file of this script ({FORMAT}).")
            if stored["settings"] != settings:
                changed = sorted(k for k in settings if stored["settings"].get(k) != settings[k])
                raise ValueError(
                    f"{path} was made with other settings ({', '.join(changed)} differ: "
                    f"{[stored['settings'].get(k) for k in changed]} there, "
                    f"{[settings[k] for k in changed]} now); give another --out to start afresh."
                )
            self.record = stored

    @property
    def done(self) -> dict:
        return {(c["table"], c["model"], c["seed"]): c for c in self.record["cells"]}

    def add_cell(self, cell: dict) -> None:
        self.record["cells"].append(cell)
        self.save()

    def save(self) -> None:
        """Write to a temporary file in the same folder and rename it: never a half file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.record, indent=1))
        os.replace(partial, self.path)


# ------------------------------------------------------------------------------ the report


def mean_std(values, scale=1.0, digits=2) -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def paper(value) -> str:
    return "—" if value is None else f"{value:g}"


def report(record: dict) -> str:
    """Markdown tables from the cells of ``record`` (whatever seeds are complete or not)."""
    cells = _Cells(record["cells"])
    parts = [_table1(cells), _robustness_tables(cells), _table4(cells), _retrieval_table(cells),
             _classification_table(cells)]
    return "\n\n".join(parts)


class _Cells:
    """The cells by (table, model, seed), and one measurement of a model over the seeds."""

    def __init__(self, cells):
        self.by_key = {(c["table"], c["model"], c["seed"]): c for c in cells}
        self.seeds = sorted({seed for (table, _, seed) in self.by_key if table != "cv"})

    def get(self, table, model, seed):
        return self.by_key.get((table, model, seed))

    def values(self, table, model, key) -> list:
        return [self.by_key[(table, model, s)][key] for s in self.seeds
                if (table, model, s) in self.by_key]


def _table1(cells) -> str:
    lines = [
        "### Birodkar et al., Table 1: test error (%)\n",
        "| network | training set | strided | learned (separability) | chosen α, norm "
        "| paper (SVHN): strided → learned |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arch in ARCHITECTURES:
        cv = cells.get("cv", arch, 0)
        chosen = f"{cv['best_params']['alpha']:g}, {cv['best_params']['norm']}" if cv else "n/a"
        for regime in REGIMES:
            row = [mean_std(cells.values("birodkar1", f"{arch}/{regime}/{p}", "test_error"), 100)
                   for p in ("strided", "separability")]
            theirs = PAPER_TABLE1.get((arch, regime))
            theirs = f"{theirs[0]} → {theirs[1]}" if theirs else "—"
            lines.append(f"| {arch} | {regime} | {row[0]} | {row[1]} | {chosen} | {theirs} |")
    return "\n".join(lines)


def _robustness_tables(cells) -> str:
    """Tables 2–3: group means of CE and FR, then CE per corruption and FR per perturbation."""
    from skpool.evaluation import (
        CORRUPTIONS,
        GEOMETRIC_CORRUPTIONS,
        GEOMETRIC_PERTURBATIONS,
        NON_GEOMETRIC_CORRUPTIONS,
        NON_GEOMETRIC_PERTURBATIONS,
        PERTURBATIONS,
        corruption_error,
        flip_rate,
    )

    lines = [
        "### Birodkar et al., Tables 2–3: corruption error and flip rate of the learned "
        "pooling vs strided (full training set; below 100 = more robust)\n",
        "| network | clean error strided → learned (%) | mCE geometric | mCE non-geometric "
        "| mFR geometric | mFR non-geometric | geometric perturbations flipping less |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    per_name = {}  # arch -> ("CE" or "FR", name) -> the ratio per seed
    for arch in ARCHITECTURES:
        ces, frs = [], []
        for seed in cells.seeds:
            base = cells.get("birodkar1", f"{arch}/full/strided", seed)
            learned = cells.get("birodkar1", f"{arch}/full/separability", seed)
            if base is None or learned is None:
                continue
            ces.append(_ratios(learned["robustness"]["corruption_errors"],
                               base["robustness"]["corruption_errors"], corruption_error))
            frs.append(_ratios(learned["robustness"]["flip_probability"],
                               base["robustness"]["flip_probability"], flip_rate))
        per_name[arch] = {("CE", name): [r[name] for r in ces] for name in CORRUPTIONS}
        per_name[arch].update({("FR", name): [r[name] for r in frs] for name in PERTURBATIONS})
        better = [sum(r.get(p) is not None and r[p] < 100 for p in GEOMETRIC_PERTURBATIONS)
                  for r in frs]
        means = [
            mean_std([_group_mean(r, names) for r in ratios], 1, 1)  # CE, FR: percent
            for ratios, names in ((ces, GEOMETRIC_CORRUPTIONS), (ces, NON_GEOMETRIC_CORRUPTIONS),
                                  (frs, GEOMETRIC_PERTURBATIONS),
                                  (frs, NON_GEOMETRIC_PERTURBATIONS))
        ]
        clean = " → ".join(
            mean_std(cells.values("birodkar1", f"{arch}/full/{p}", "test_error"), 100)
            for p in ("strided", "separability"))
        count = (f"{mean_std(better, digits=1)} of {len(GEOMETRIC_PERTURBATIONS)}" if better
                 else "n/a")
        lines.append(f"| {arch} | {clean} | {' | '.join(means)} | {count} |")
    lines.append(f"\nPaper (CIFAR-10-C/P): {PAPER_TABLE3_FLIPS}; its CE figures are not listed "
                 "here.\n")
    lines.append("| corruption (CE %) or perturbation (FR %) | geometric | "
                 + " | ".join(ARCHITECTURES) + " |")
    lines.append("| --- | --- |" + " --- |" * len(ARCHITECTURES))
    geometric = set(GEOMETRIC_CORRUPTIONS) | set(GEOMETRIC_PERTURBATIONS)
    for kind, names in (("CE", CORRUPTIONS), ("FR", PERTURBATIONS)):
        for name in names:
            row = [mean_std(per_name[arch][kind, name], 1, 1) for arch in ARCHITECTURES]
            lines.append(f"| {kind} {name} | {'yes' if name in geometric else 'no'} "
                         f"| {' | '.join(row)} |")
    return "\n".join(lines)


def _table4(cells) -> str:
    lines = [
        "### Birodkar et al., Table 4: SGD-learned vs closed-form pooling, test error (%)\n",
        "| network | training set | strided | closed form (separability) | learned by SGD |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arch in ARCHITECTURES:
        for regime in REGIMES:
            row = [mean_std(cells.values(table, f"{arch}/{regime}/{p}", "test_error"), 100)
                   for table, p in (("birodkar1", "strided"), ("birodkar1", "separability"),
                                    ("birodkar4", "sgd"))]
            lines.append(f"| {arch} | {regime} | {' | '.join(row)} |")
    return "\n".join(lines)


def _retrieval_table(cells) -> str:
    lines = [
        "### Christlein et al., Tables I–II: retrieval, test images querying each other (%)\n",
        "| global pooling | mAP | top-1 | learned λ | paper mAP (ICDAR17) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for head in RETRIEVAL_HEADS:
        dgmp = head in DGMP_LAMBDAS
        lam = mean_std(cells.values("christlein12", head, "learned_lambda"), digits=3) \
            if dgmp else "—"
        theirs = PAPER_TABLE2_MAP["dgmp" if dgmp else head]
        lines.append(
            f"| {_head_name(head)} | {mean_std(cells.values('christlein12', head, 'mAP'), 100)} "
            f"| {mean_std(cells.values('christlein12', head, 'top1'), 100)} | {lam} "
            f"| {paper(theirs)} |")
    return "\n".join(lines)


def _classification_table(cells) -> str:
    lines = [
        "### Christlein et al., Table III: classification accuracy (%)\n",
        "| global pooling | accuracy | paper (CLaMM16) |",
        "| --- | --- | --- |",
    ]
    avg = cells.values("birodkar1", "cnn/full/strided", "test_error")
    lines.append(f"| average (Table 1's strided CNN) | {mean_std([1 - e for e in avg], 100)} "
                 f"| {paper(PAPER_TABLE3_ACCURACY['avg'])} |")
    for head in CLASSIFICATION_HEADS:
        accuracy = [1 - e for e in cells.values("christlein3", head, "test_error")]
        theirs = PAPER_TABLE3_ACCURACY["dgmp" if head in DGMP_LAMBDAS else head]
        lines.append(f"| {_head_name(head)} | {mean_std(accuracy, 100)} | {paper(theirs)} |")
    return "\n".join(lines)


def _ratios(model: dict, baseline: dict, ratio) -> dict:
    result = {}
    for name, value in model.items():
        try:
            result[name] = ratio(value, baseline[name])
        except ValueError:  # the baseline never errs / never flips: undefined
            result[name] = None
    return result


def _group_mean(per_name: dict, names) -> float | None:
    defined = [per_name[n] for n in names if per_name.get(n) is not None]
    return float(np.mean(defined)) if defined else None


def _head_name(head: str) -> str:
    if head in DGMP_LAMBDAS:
        return f"DGMP, λ₀ = {DGMP_LAMBDAS[head]:g} (absolute)"
    return {"avg": "average", "max": "max", "mixed": "mixed max/avg", "lse": "log-sum-exp"}[head]


SWEEP_UNITS = {
    "translate": "shift (pixels)", "rotate": "angle (°)", "scale": "scale factor",
    "shear": "angle (°)", "tilt": "angle (°)", "zoom_blur": "largest zoom",
    "brightness": "change of value", "gaussian_blur": "σ (pixels)",
}


def plot_flips(record: dict, path: Path) -> None:
    """Flip probability at each step of the geometric and other ordered sweeps, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skpool.datasets import IMAGE_SIZE
    from skpool.evaluation import NOISE_PERTURBATIONS, PERTURBATIONS, SWEEP_RANGES

    names = [name for name in PERTURBATIONS if name not in NOISE_PERTURBATIONS]
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(10, 5), sharey=True)
    styles = {"cnn": "-", "resnet": "--"}
    colours = {"strided": "tab:blue", "separability": "tab:red"}
    for ax, name in zip(axes.flat, names):
        for arch in ARCHITECTURES:
            for pooling in ("strided", "separability"):
                runs = [c["robustness"]["flips_per_step"][name] for c in record["cells"]
                        if c["table"] == "birodkar1" and c["model"] == f"{arch}/full/{pooling}"]
                if not runs:
                    continue
                steps = np.mean(runs, axis=0)
                start, stop, _ = SWEEP_RANGES[name]
                scale = IMAGE_SIZE if name == "translate" else 1  # a fraction of the width
                strength = scale * np.linspace(start, stop, len(steps) + 1)[1:]
                ax.plot(strength, 100 * steps, styles[arch], color=colours[pooling], lw=1.2,
                        label=f"{arch}, {pooling}")
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_xlabel(SWEEP_UNITS.get(name, "strength"), fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("flip probability (%)", fontsize=8)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("Flips between consecutive frames along each sweep (x: the frame's strength)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


# ------------------------------------------------------------------------------ the run


def machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "simd": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def load_data(args) -> dict:
    from skpool.datasets import make_svhn_like

    full = make_svhn_like(args.train_size, args.test_size, color=args.color, random_state=0)
    reduced = make_svhn_like(args.train_size, 0, reduced=True, color=args.color, random_state=0)
    return {
        "full": (full.X_train, full.y_train),
        "reduced": (reduced.X_train, reduced.y_train),
        "test": (full.X_test, full.y_test),
    }


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"the quick sizes: {QUICK}")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 (quick: 1, full: 5)")
    parser.add_argument("--train-size", type=int, help="training images of the full set")
    parser.add_argument("--test-size", type=int)
    parser.add_argument("--sequences", type=int, help="test images that start a sequence")
    parser.add_argument("--epochs", type=int, help="epochs on the full training set")
    parser.add_argument("--reduced-epochs", type=int, help="epochs on the reduced set (5%%)")
    parser.add_argument("--width", type=int, help="stem channels of the CNN (the paper: 64)")
    parser.add_argument("--resnet-width", type=float, help="ResNet-18 width multiplier")
    parser.add_argument("--stage", type=int, choices=(0, 1, 2),
                        help="the downsampling point that gets the learned pooling")
    parser.add_argument("--alpha-grid", type=_floats, help="comma-separated α values")
    parser.add_argument("--norm-grid", type=lambda s: s.split(","), help="e.g. l1,l2")
    parser.add_argument("--cv", type=int, help="cross-validation folds")
    parser.add_argument("--color", action="store_true", default=None, help="3-channel images")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads, fixed (1: a shared, loaded CPU runs fastest so)")
    parser.add_argument("--out", type=Path, required=True, help="the results file (JSON)")
    parser.add_argument("--plot", type=Path, help="save the flip-probability plot (PNG) here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seeds < 1 or args.cv < 2 or args.train_size < 20 or args.test_size < 2:
        parser.error("need --seeds >= 1, --cv >= 2, --train-size >= 20, --test-size >= 2")
    args.channels = 3 if args.color else 1
    return args


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def run_cells(todo, done, results, args, argv) -> None:
    """Compute the cells ``todo`` in order, saving the file after each; one session record."""
    from tqdm.auto import tqdm

    session = {
        "command": shlex.join(["python", "examples/paper_tables.py", *(argv or sys.argv[1:])]),
        "machine": machine(args.threads),
        "device": args.device,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "computed": 0,
        "resumed": len(done),
        "seconds": 0.0,
    }
    results.record["sessions"].append(session)
    start = time.perf_counter()
    data = load_data(args)
    bar = tqdm(todo, desc="cells", unit="cell", disable=args.no_progress, file=sys.stderr)
    for table, model, seed in bar:
        bar.set_postfix_str(f"{table} {model} seed {seed}")
        began = time.perf_counter()
        measured = compute_cell(table, model, seed, data, args, done)
        cell = {"table": table, "model": model, "seed": seed,
                "seconds": round(time.perf_counter() - began, 2), **measured}
        done[(table, model, seed)] = cell
        session["computed"] += 1
        session["seconds"] = round(time.perf_counter() - start, 1)
        results.add_cell(cell)


def describe(settings: dict, record: dict) -> str:
    """The sizes, and for every session its command, machine, cells and wall time."""
    lines = [
        f"SVHN-like digits: {settings['train_size']:,} training images (reduced: 5%), "
        f"{settings['test_size']:,} test images, {settings['sequences']} perturbation "
        f"sequences; CNN width {settings['width']}, ResNet-18 × {settings['resnet_width']:g}; "
        f"{settings['epochs']} epochs (reduced: {settings['reduced_epochs']}); learned point "
        f"{settings['stage']}; α ∈ {settings['alpha_grid']}, norm ∈ {settings['norm_grid']} by "
        f"{settings['cv']}-fold CV; seeds {sorted({c['seed'] for c in record['cells']})}."
    ]
    for number, session in enumerate(record["sessions"], start=1):
        info = session["machine"]
        lines.append(
            f"Session {number} ({session['started']}): {session['computed']} cells in "
            f"{session['seconds']:.0f} s on {info['cpu']} ({info['cpus']} CPUs, ATen "
            f"{info['simd']}), {info['threads']} torch thread(s), device {session['device']}, "
            f"{info['gpu'] or 'no GPU'}, torch {info['torch']}: `{session['command']}`"
        )
    compute = sum(c["seconds"] for c in record["cells"])
    lines.append(f"All {len(record['cells'])} cells: {compute:.0f} s of compute.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic CUDA GEMMs
    torch.set_num_threads(args.threads)  # a fixed summation order (no batched LU is used)
    torch.use_deterministic_algorithms(True)
    settings = {key: getattr(args, key) for key in SETTINGS}
    try:
        results = ResultsFile(args.out, settings)
    except ValueError as error:
        sys.exit(f"error: {error}")
    done = results.done
    todo = [cell for cell in planned_cells(args.seeds) if cell not in done]
    print(f"{len(todo)} cells to compute, {len(done)} already in {args.out}", flush=True)
    if todo:  # a run with nothing to compute leaves the file as it was
        run_cells(todo, done, results, args, argv)
    record = results.record
    header = describe(settings, record)
    text = header + "\n" + report(record)
    print("\n" + text)
    args.out.with_suffix(".md").write_text(text + "\n")
    if args.plot is not None:
        plot_flips(record, args.plot)
        print(f"\nplot: {args.plot}")
    return record


if __name__ == "__main__":
    main()
