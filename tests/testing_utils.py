"""Helpers shared by the tests (importable because pyproject sets pythonpath = ["tests"])."""

import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA is not available")
#: Parametrize over devices; the CUDA case skips cleanly (and visibly) without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.gpu])]
