"""NVlabs StyleGAN2-ADA network pickles (``network-snapshot-*.pkl``, the released ffhq/metfaces/afhq/cifar
networks) read without running the code they carry.

NVlabs' persistence module stores each network class's source code in the pickle and executes it on load. Here a
restricted unpickler admits only what weights need (torch's tensor and parameter rebuilders, storages read with
``torch.load(weights_only=True)``, ordered and attribute dicts, sets) and turns each persistent object into a record
of its class name and state (``_parameters``, ``_buffers``, ``_modules``, ``_init_kwargs``) without importing or
running its source. Anything else in the pickle (``os.system``, any other import) is refused before it runs.

Every NVlabs network also holds numpy scalars (``weight_gain = lr_multiplier / np.sqrt(in_features)``), pickled as
``numpy.core.multiarray.scalar(numpy.dtype('f8', False, True), <8 bytes>)`` (``numpy._core`` under numpy 2), the
dtype then given its byte order by ``BUILD``. numpy's own reconstructors are not called: a dtype is a stand-in that
admits only simple numeric types and the plain state they pickle with, and a scalar is read from its bytes with
``numpy.frombuffer``. The released pickles were written by Python 3.7 (protocol 3), whose modules' sets
(``_non_persistent_buffers_set``) are ``builtins.set`` calls.
"""

from __future__ import annotations

import collections
import io
import pickle
import reprlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from daskgan.errors import CheckpointUnreadable, UnsafePickle


@dataclass
class PersistentRecord:
    """What NVlabs' pickle holds for one network object: its class name and recorded state (source not run)."""

    class_name: str
    state: dict = field(default_factory=dict)

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs") or {})

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Every parameter and buffer of this object and its sub-objects, under ``state_dict()``-style names.

        NVlabs' networks hold each sub-network once; a pickle's memo can make one that holds itself (an endless
        walk) or a chain of children each held twice (2**depth names from a few KB), so one reached twice is
        refused."""
        return self._tensors(prefix, set())

    def _tensors(self, prefix: str, seen: set[int]) -> dict[str, torch.Tensor]:
        if id(self) in seen:
            raise CheckpointUnreadable(f"{prefix.rstrip('.')}: a sub-network held twice (in itself, or in two "
                                       f"places); an NVlabs network holds each of its sub-networks once")
        seen.add(id(self))
        found = {}
        for kind in ("_parameters", "_buffers"):
            for name, tensor in (self.state.get(kind) or {}).items():
                if tensor is not None:
                    found[prefix + name] = tensor.detach()
        for name, child in (self.state.get("_modules") or {}).items():
            if isinstance(child, PersistentRecord):
                found.update(child._tensors(f"{prefix}{name}.", seen))
            elif child is not None:
                raise CheckpointUnreadable(f"{prefix}{name}: a sub-network that is not an NVlabs persistent object")
        return found


class ModuleRecord(PersistentRecord):
    """A torch module pickled as itself rather than through NVlabs' persistence (R3GAN's networks): the pickle
    makes it with ``cls.__new__(cls)`` and gives it its ``__dict__`` by ``BUILD``. Its class is a record of the
    name (``module_record``), never imported; the ``__dict__`` is kept as the state."""

    def __new__(cls, *args: Any) -> "ModuleRecord":
        if args:
            raise UnsafePickle(f"it makes a {_shown(cls.class_name)} with arguments; a pickled module takes none")
        record = super().__new__(cls)
        record.state = {}
        return record

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise CheckpointUnreadable(f"a {_shown(self.class_name)} whose state is not a module's attributes")
        self.state = state


def module_record(class_name: str) -> type[ModuleRecord]:
    """The stand-in for a pickled module class named ``class_name`` (what ``read_pickle``'s ``admitted`` maps
    the pickle's module and name to)."""
    return type("ModuleRecord", (ModuleRecord,), {"class_name": class_name})


class AttributeDict(dict):
    """Stands in for ``dnnlib.EasyDict`` (a dict whose keys are also attributes) as a plain dict."""


def _persistent_object(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise CheckpointUnreadable("a persistent object without a recorded class state")
    return PersistentRecord(str(meta.get("class_name")), meta["state"])


def _storage_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class NumpyDtype:
    """What ``numpy.dtype(name, align, copy)`` and the ``BUILD`` after it hold of a simple numeric dtype."""

    SIMPLE = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16"})
    PLAIN_STATE = (None, None, None, -1, -1, 0)  # no sub-array, fields, size, alignment or flags of its own

    def __init__(self, name: Any, align: Any = False, copy: Any = True):
        if name not in self.SIMPLE or not isinstance(align, bool) or not isinstance(copy, bool):
            raise UnsafePickle(f"it asks for numpy dtype {reprlib.repr(name)}; only simple numeric dtypes are read")
        self.name, self.byteorder = name, "="

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                and state[2:] == self.PLAIN_STATE):
            raise UnsafePickle(f"it gives numpy dtype {self.name!r} the state {reprlib.repr(state)}, not a simple "
                               f"numeric one")
        self.byteorder = state[1]

    def numpy(self) -> np.dtype:
        return np.dtype(self.name).newbyteorder(self.byteorder)


def _numpy_scalar(dtype: Any, data: Any) -> np.generic:
    """numpy's ``scalar(dtype, bytes)``, for the simple dtypes above only, read from the bytes alone."""
    if not isinstance(dtype, NumpyDtype) or not isinstance(data, bytes) or len(data) != dtype.numpy().itemsize:
        raise UnsafePickle("it holds a numpy scalar that is not the bytes of one simple numeric value")
    return np.frombuffer(data, dtype=dtype.numpy())[0]


ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): AttributeDict,
    ("builtins", "set"): set,
    ("numpy", "dtype"): NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy 1, as the released pickles were written
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2
}


def _shown(text: str) -> str:
    """``text`` from a pickle, for a one-line message: as it is when short and printable, else shortened (a crafted
    pickle's names may hold line breaks or megabytes)."""
    return text if len(text) <= 100 and text.isprintable() else reprlib.repr(text)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, admitted: Mapping[tuple[str, str], Any]):
        super().__init__(file)
        self.allowed = {**ALLOWED, **admitted}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafePickle(f"it asks to import {_shown(f'{module}.{name}')}; only tensors and plain containers are "
                               f"read from NVlabs pickles, and nothing in them is run") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("it holds external references (not an NVlabs network pickle)")


def read_pickle(data: bytes, url: str, admitted: Mapping[tuple[str, str], Any] | None = None) -> dict[str, Any]:
    """The top-level dict of an NVlabs pickle (``G``, ``D``, ``G_ema``, ... as ``PersistentRecord``s), or of a
    pickle of the same layout whose networks are modules of the classes ``admitted`` maps to ``module_record``
    stand-ins (R3GAN's: ``daskgan.pretrained.r3gan.ADMITTED``), besides what NVlabs' pickles need."""
    try:
        top = _RestrictedUnpickler(io.BytesIO(data), admitted or {}).load()
    except CheckpointUnreadable as error:
        raise type(error)(f"{url}: {error}") from None
    except Exception as error:  # a damaged or foreign pickle
        raise CheckpointUnreadable(f"{url} is not a readable NVlabs network pickle ({type(error).__name__}: "
                                   f"{error})") from None
    if not isinstance(top, dict) or not any(isinstance(top.get(k), PersistentRecord) for k in ("G", "G_ema")):
        raise CheckpointUnreadable(f"{url}: an NVlabs pickle holds a dict with G and G_ema networks; this one does not")
    return top


def is_pickle(data: bytes) -> bool:
    """Whether ``data`` is a plain pickle (NVlabs' format) rather than a torch zip checkpoint."""
    return data[:1] == b"\x80" and not data.startswith(b"PK")
