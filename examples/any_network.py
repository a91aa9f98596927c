"""Learned pooling in your own network: a torchvision-style ResNet-18 and one fit_pooling call.
============================================================================================

Trains a ResNet-18 with torchvision's layout (conv1, bn1, relu, maxpool, layer1..layer4 of
BasicBlocks with conv1/bn1/conv2/bn2/downsample, avgpool, fc) on SVHN-like digits
(:func:`skpool.datasets.make_svhn_like`, colour, per-image standardised), fits separability
pooling at a downsampling point with :func:`skpool.nn.fit_pooling` (the strided ``conv1`` of
``layer2``'s first block by default), retrains (fine-tuning the swapped network), and reports
the test errors with the machine and the wall time. The
baseline is trained for the same extra epochs, so that the comparison is at equal training.

torchvision's ``resnet18`` is used when torchvision imports and ``--width 64`` (its width);
otherwise the same network is built from torch alone (:func:`resnet18_like`).

Run:  python examples/any_network.py   (328 s on a shared 2-core Xeon at load ~8; less when idle)
      python examples/any_network.py --points maxpool layer2.0.conv1 --norm l2
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn

from skpool import SeparabilityPooling, describe_device
from skpool.datasets import make_svhn_like
from skpool.nn import fit_pooling


# -- a torchvision-style ResNet-18, from torch alone ----------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv1 (3×3, stride s), bn1, relu, conv2, bn2, downsample."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Like(nn.Module):
    """torchvision's ``resnet18`` layout and module names, with a free base ``width``."""

    def __init__(self, num_classes: int = 1000, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        layers, channels = [], width
        for index, out in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers.append(nn.Sequential(BasicBlock(channels, out, stride), BasicBlock(out, out)))
            channels = out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_like(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> nn.Module:
    """torchvision's ``resnet18`` when torchvision imports and the sizes are its own; else the
    same layout from torch alone (:class:`ResNet18Like`)."""
    if width == 64 and in_channels == 3:
        try:
            from torchvision.models import resnet18
        except Exception:  # absent, or a build that does not match this torch
            pass
        else:
            return resnet18(num_classes=num_classes)
    return ResNet18Like(num_classes, width, in_channels)


# -- data and training -----------------------------------------------------------------------------
def standardise(images: np.ndarray) -> torch.Tensor:
    """Per-image standardisation (zero mean, unit variance per image): the raw SVHN-like
    images do not train well."""
    images = torch.as_tensor(images, dtype=torch.float32)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    std = images.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return (images - mean) / std


def batches(images, labels, batch_size, shuffle=False, seed=0):
    """A re-iterable of (images, labels) batches: a DataLoader over tensors."""
    dataset = torch.utils.data.TensorDataset(images, torch.as_tensor(labels))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size, shuffle=shuffle, generator=generator)


def train(model, loader, epochs, lr=1e-3) -> nn.Module:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    return model


@torch.no_grad()
def error(model, loader) -> float:
    mode = model.training
    model.eval()
    wrong = total = 0
    for images, labels in loader:
        wrong += int((model(images).argmax(1) != labels).sum())
        total += len(labels)
    model.train(mode)
    return wrong / total


def main(n_train=3000, n_test=1000, epochs=5, retrain_epochs=2, width=16,
         points=("layer2.0.conv1",), alpha=10.0, norm="l1", batch_size=64, seed=0,
         verbose=True) -> dict:
    start = time.perf_counter()
    torch.manual_seed(seed)
    X_train, X_test, y_train, y_test = make_svhn_like(
        n_train, n_test, color=True, random_state=seed, return_X_y=True
    )
    train_data = batches(standardise(X_train), y_train, batch_size, shuffle=True, seed=seed)
    test_data = batches(standardise(X_test), y_test, 256)
    fit_data = batches(standardise(X_train), y_train, 256)  # the maps' batches, in order

    model = train(resnet18_like(10, width), train_data, epochs)
    before = error(model, test_data)
    baseline = train(copy.deepcopy(model), train_data, retrain_epochs)  # equal training

    fit_start = time.perf_counter()
    estimators = {name: SeparabilityPooling(alpha=alpha, norm=norm, device="cpu")
                  for name in points}
    fit_pooling(model, estimators, fit_data)
    fit_seconds = time.perf_counter() - fit_start
    swapped = error(model, test_data)
    train(model, train_data, retrain_epochs)
    results = {
        "network": type(model).__name__,
        "points": list(points),
        "error_before": before,
        "error_swapped": swapped,
        "error_after": error(model, test_data),
        "error_baseline": error(baseline, test_data),
        "fit_seconds": fit_seconds,
        "seconds": time.perf_counter() - start,
        "machine": describe_device("cpu"),
    }
    if verbose:
        print(f"{results['network']} (width {width}), {n_train} training / {n_test} test "
              f"SVHN-like images, seed {seed}; separability pooling at {list(points)}, "
              f"alpha {alpha}, norm {norm}")
        print(f"  test error after {epochs} epochs:               {before:.3f}")
        print(f"  right after fit_pooling ({fit_seconds:.1f} s):       {swapped:.3f}")
        print(f"  after {retrain_epochs} more epochs, learned pooling:  "
              f"{results['error_after']:.3f}")
        print(f"  after {retrain_epochs} more epochs, baseline:        "
              f"{results['error_baseline']:.3f}")
        print(f"  {results['machine']}; wall time {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--retrain-epochs", type=int, default=2)
    parser.add_argument("--width", type=int, default=16,
                        help="base width (64 is torchvision's, and uses it when installed)")
    parser.add_argument("--points", nargs="+", default=["layer2.0.conv1"],
                        help="module names to learn the pooling of (e.g. maxpool)")
    parser.add_argument("--alpha", type=float, default=10.0)
    parser.add_argument("--norm", choices=("l1", "l2"), default="l1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.n_train, args.n_test, args.epochs, args.retrain_epochs, args.width,
         tuple(args.points), args.alpha, args.norm, seed=args.seed)
