"""``skpool.describe_device``: the machine named beside every timing and example table."""

import pytest
import torch

import skpool
from skpool import describe_device


def test_cpu_description_names_the_model_simd_level_and_threads():
    text = describe_device("cpu")
    capability = torch.backends.cpu.get_cpu_capability()
    assert text.startswith("CPU ")
    assert f"ATen {capability}" in text
    assert f"{torch.get_num_threads()} torch threads" in text
    model = text[len("CPU "): text.index(", ATen")]
    assert model.strip()  # a model name (or the platform's), never empty


def test_cpu_model_falls_back_without_proc_cpuinfo(monkeypatch):
    """Without /proc/cpuinfo (macOS, Windows) the platform module names the CPU."""
    import builtins

    from skpool import _device

    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise OSError("no such file")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(_device.platform, "processor", lambda: "")
    monkeypatch.setattr(_device.platform, "machine", lambda: "x86_64")
    assert describe_device("cpu").startswith("CPU x86_64, ATen ")


def test_bad_device_is_refused_like_resolve_device():
    with pytest.raises(ValueError):
        describe_device("tpu")


def test_is_public():
    assert "describe_device" in skpool.__all__ and "describe_device" in dir(skpool)
