"""skpool.nn layers drop into a torchvision-style network in place of nn.AdaptiveAvgPool2d(1)
and of a strided pooling layer, train, save and reload (the "done when" of issue 5)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from separability_reference import pooling_bound
from skpool import SeparabilityPooling
from skpool.nn import GeneralizedMaxPool2d, SeparabilityPool2d


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, without downsampling."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    """The shape of torchvision's ResNet: stem, blocks, a strided pooling, avgpool, flatten, fc."""

    def __init__(self, width: int = 12, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = BasicBlock(width)
        self.downsample = nn.AvgPool2d(2)  # 8x8 -> 4x4
        self.layer2 = BasicBlock(width)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        x = self.layer2(self.downsample(x))
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


def digits(n_samples: int):
    images, labels = load_digits(return_X_y=True)
    images = torch.tensor(images[:n_samples] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return images, torch.tensor(labels[:n_samples])


def train(model, images, labels, epochs, lr=1e-2):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(50):
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def loss_and_accuracy(model, images, labels):
    with torch.no_grad():
        logits = model(images)
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return nn.functional.cross_entropy(logits, labels).item(), accuracy


def swap_in_skpool_layers(model, operator_layer):
    model.downsample = operator_layer
    model.avgpool = GeneralizedMaxPool2d(lam=10.0, flatten=False)
    return model


@pytest.mark.slow
def test_drop_in_trains_saves_and_reloads():
    """The paper's procedure in miniature: train with average pooling, fit the separability
    operator on the feature maps entering the strided pooling, swap both pooling layers for
    skpool's, keep training, save, reload into a fresh model, same outputs."""
    torch.manual_seed(0)
    images, labels = digits(600)
    train_idx, test_idx = torch.arange(450), torch.arange(450, 600)
    model = TinyResNet()
    train(model, images[train_idx], labels[train_idx], epochs=3)

    with torch.no_grad():
        maps = model.layer1(model.stem(images[train_idx]))  # (n, C, 8, 8)
    estimator = SeparabilityPooling(alpha=1.0, stride=2, device="cpu")
    estimator.fit(maps.permute(0, 2, 3, 1).numpy(), labels[train_idx].numpy())
    swap_in_skpool_layers(model, SeparabilityPool2d.from_estimator(estimator))
    assert model.downsample(maps).shape == (450, 12, 4, 4)
    # The layer and the estimator's transform: two float32 code paths, each within the
    # pooling product's rounding bound (separability_reference.pooling_bound).
    maps_last = maps.permute(0, 2, 3, 1).numpy()
    bound = 2 * pooling_bound(maps_last.reshape(450, 64, 12), estimator.operator_,
                              estimator.channel_mean_, estimator.channel_scale_,
                              np.finfo(np.float32).eps)
    np.testing.assert_allclose(model.downsample(maps).permute(0, 2, 3, 1).numpy(),
                               estimator.transform(maps_last), rtol=0, atol=bound)

    before, _ = loss_and_accuracy(model, images[train_idx], labels[train_idx])
    lam_before = model.avgpool.lam.item()
    operator_before = model.downsample.operator.clone()
    train(model, images[train_idx], labels[train_idx], epochs=3, lr=3e-3)
    after, _ = loss_and_accuracy(model, images[train_idx], labels[train_idx])
    _, test_accuracy = loss_and_accuracy(model, images[test_idx], labels[test_idx])
    # Training outcomes, not rounding: the loss falls, accuracy far above chance (0.1)
    assert after < before
    assert test_accuracy > 0.5  # chance: 0.1
    assert model.avgpool.lam.item() != lam_before  # λ trains with the network
    assert torch.equal(model.downsample.operator, operator_before)  # frozen: never written

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = swap_in_skpool_layers(
        TinyResNet(),
        SeparabilityPool2d(
            torch.zeros(1, 16, 64), torch.zeros(12), torch.ones(12),
            output_shape=(4, 4), grid_shape=(8, 8),
        ),
    )
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.eval()
    with torch.no_grad():
        # Exact: the same weights and buffers, the same code on the same data and shapes.
        torch.testing.assert_close(fresh(images[test_idx]), model(images[test_idx]),
                                   rtol=0, atol=0)


def test_gmp_replaces_adaptive_avg_pool_in_place():
    """Only the pooling layer changes; flatten + fc work unchanged, gradients reach λ."""
    torch.manual_seed(1)
    model = TinyResNet()
    images, labels = digits(32)
    model.avgpool = GeneralizedMaxPool2d(flatten=False)
    logits = model(images)
    assert logits.shape == (32, 10)
    nn.functional.cross_entropy(logits, labels).backward()
    assert model.avgpool.log_lam.grad is not None and torch.isfinite(model.avgpool.log_lam.grad)
    assert "avgpool.log_lam" in model.state_dict()
