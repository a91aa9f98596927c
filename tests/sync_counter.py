"""Count the calls that make the host wait for the device (issue 27, item 1).

On a GPU each of these stalls the stream until the queued kernels have run: reading a value
(``item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``), copying to the
host (``cpu``, ``numpy``), and operations whose output size depends on the data (``nonzero``,
boolean-mask indexing, ``masked_select``, ``unique``, one-argument ``torch.where``...).

A ``TorchFunctionMode`` sees every torch call made from Python in the forward, but the autograd
engine runs backward functions (a custom Function's ``backward`` included) without the mode;
there the same calls are counted by wrappers installed on ``torch.Tensor`` and ``torch`` for
the duration of the block (they count only while the mode is not active, so nothing is counted
twice).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

_TENSOR_METHODS = (
    "item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "cpu",
    "numpy", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
    "__getitem__", "__setitem__",
)
_TORCH_FUNCTIONS = ("nonzero", "argwhere", "masked_select", "unique", "where")
_ALWAYS = set(_TENSOR_METHODS) - {"__getitem__", "__setitem__"} | {"nonzero_static"}


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _syncing_call(name, args, kwargs) -> str | None:
    """The name to count for a call of ``name`` with these arguments, or None."""
    if name in _ALWAYS:
        return name
    if name == "where" and len(args) + len(kwargs) == 1:  # torch.where(condition)
        return "where(condition)"
    if name in ("__getitem__", "__setitem__", "index_put", "index_put_") and len(args) > 1:
        if _has_bool_index(args[1]):
            return f"{name}[bool]"
    return None


class SyncCounter(TorchFunctionMode):
    """``with SyncCounter() as counter: ...`` then ``counter.calls`` (a Counter of names) and
    ``counter.total``."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()
        self._saved = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counted = _syncing_call(getattr(func, "__name__", ""), args, kwargs)
        if counted:
            self.calls[counted] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for owner, names in ((torch.Tensor, _TENSOR_METHODS), (torch, _TORCH_FUNCTIONS)):
            for name in names:
                original = getattr(owner, name)
                self._saved.append((owner, name, original))
                setattr(owner, name, self._wrap(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for owner, name, original in reversed(self._saved):
                setattr(owner, name, original)
            self._saved.clear()

    def _wrap(self, name, original):
        calls = self.calls

        def wrapper(*args, **kwargs):
            if not torch._C._is_torch_function_mode_enabled():  # in backward: no mode
                counted = _syncing_call(name, args, kwargs)
                if counted:
                    calls[counted] += 1
            return original(*args, **kwargs)

        return wrapper

    @property
    def total(self) -> int:
        return sum(self.calls.values())
