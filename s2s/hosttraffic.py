"""Count what torch code moves between the host and the device, on any device, the CPU too.

On a GPU every value the host reads back (``tolist``, ``item``, ``int(t)``, ``bool(t)``, ``cpu``,
``numpy``) waits for all the work queued before it: a host sync, after which the GPU idles until
the host has launched the next kernels. Every tensor made from host values (``torch.tensor``,
``as_tensor``, ``from_numpy``, indexing with a Python list) is a copy to the device, and one
from pageable memory may wait for the device too. The profiler sees neither on a CPU, where
these calls cost nothing, so a model step's host traffic could only be measured on a GPU.
``HostTraffic`` sees the calls themselves (a ``TorchFunctionMode``), so a test on a CPU can hold
a step to the reads and uploads it is designed for.

``upload`` and ``download`` are how a step stays within them: all of a step's host values in one
copy to the device, all of its results in one copy back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence, Sized
from itertools import chain
from typing import Any
from weakref import ref

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor

#: Tensor methods that hand a value to the host.
_READS = {
    Tensor.tolist, Tensor.item, Tensor.__int__, Tensor.__float__, Tensor.__bool__,
    Tensor.__index__, Tensor.numpy, Tensor.cpu,
}  # fmt: skip
#: Functions that make a tensor of host values.
_UPLOADS = {torch.tensor, torch.as_tensor, torch.from_numpy}
_INDEXING = {Tensor.__getitem__, Tensor.__setitem__}


def _holds_list(index: Any) -> bool:
    """Whether an index has a Python list in it (torch makes it a tensor: an upload)."""
    if isinstance(index, list):
        return True
    return isinstance(index, tuple) and any(isinstance(part, list) for part in index)


def _empty(args: Sequence[Any]) -> bool:
    """Whether ``torch.tensor``'s data is an empty sequence (nothing to copy: caches start so)."""
    return bool(args) and isinstance(args[0], list | tuple) and not args[0]


def _to_host(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """Whether ``Tensor.to`` moves a device tensor to the host (on a CPU run, never)."""
    device = kwargs.get("device")
    for arg in args[1:]:
        if isinstance(arg, str | torch.device):
            device = arg
    source = args[0] if args else None
    return (
        device is not None
        and torch.device(device).type == "cpu"
        and isinstance(source, Tensor)
        and source.device.type != "cpu"
    )


class HostTraffic(TorchFunctionMode):
    """Within ``with HostTraffic() as traffic:``, ``traffic.reads`` and ``traffic.uploads`` count
    the calls that read a tensor's value on the host and that make a tensor of host values,
    each by the name of the call."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.uploads: Counter[str] = Counter()
        # Tensors already read back: ``t.cpu().numpy()`` is one copy, not two.
        self._fetched: dict[int, ref[Tensor]] = {}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if func in _READS or (func is Tensor.to and _to_host(args, kwargs)):
            source = args[0] if args else None
            known = self._fetched.get(id(source))
            if known is None or known() is not source:
                self.reads[name] += 1
            out = func(*args, **kwargs)
            if isinstance(out, Tensor):
                self._fetched[id(out)] = ref(out)
            return out
        if (func in _UPLOADS and not _empty(args)) or (
            func in _INDEXING and len(args) > 1 and _holds_list(args[1])
        ):
            self.uploads[name] += 1
        return func(*args, **kwargs)


def upload(
    device: torch.device, dtype: torch.dtype, **columns: Sequence[float]
) -> dict[str, Tensor]:
    """``columns`` of host numbers as tensors of ``dtype`` on ``device``, in one copy.

    On a GPU the values are staged in pinned memory and copied without waiting: the copy is
    queued behind the work already launched, and the host goes on launching.
    """
    return split(upload_flat(device, dtype, **columns), columns)


def upload_flat(device: torch.device, dtype: torch.dtype, **columns: Sequence[float]) -> Tensor:
    """``upload``'s one tensor, every column one after the other (``split`` names them)."""
    sizes = [len(column) for column in columns.values()]
    flat: np.ndarray = np.fromiter(chain.from_iterable(columns.values()), _NUMPY[dtype], sum(sizes))
    host = torch.as_tensor(flat)  # shares the array: no copy yet
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def split(flat: Tensor, columns: Mapping[str, Sized]) -> dict[str, Tensor]:
    """``flat`` cut into views named and sized as ``columns`` (in order), from its start."""
    sizes = [len(column) for column in columns.values()]
    parts = torch.split(flat[: sum(sizes)], sizes)
    return dict(zip(columns, parts, strict=True))


def download(*tensors: Tensor) -> list[np.ndarray]:
    """``tensors`` (any shapes and dtypes whose values float32 holds exactly: token ids, codes,
    audio) read back to the host in one copy, the step's one host sync; float32 arrays, each
    in its tensor's shape."""
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
    if flat.device.type == "cuda":
        staged = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        staged.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(flat.device).synchronize()
        flat = staged
    host = flat.numpy()
    out, start = [], 0
    for tensor in tensors:
        out.append(host[start : start + tensor.numel()].reshape(tensor.shape))
        start += tensor.numel()
    return out


_NUMPY = {torch.int64: np.int64, torch.float32: np.float32, torch.bool: np.bool_}
