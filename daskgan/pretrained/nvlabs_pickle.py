"""NVlabs StyleGAN2-ADA network pickles (``network-snapshot-*.pkl``, the released ffhq/metfaces/afhq/cifar
networks) read without running the code they carry.

NVlabs' persistence module stores each network class's source code in the pickle and executes it on load. Here a
restricted unpickler admits only what weights need (torch's tensor and parameter rebuilders, storages read with
``torch.load(weights_only=True)``, ordered and attribute dicts) and turns each persistent object into a record of
its class name and state (``_parameters``, ``_buffers``, ``_modules``, ``_init_kwargs``) without importing or
running its source. Anything else in the pickle (``os.system``, any other import) is refused before it runs.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass, field
from typing import Any

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
        """Every parameter and buffer of this object and its sub-objects, under ``state_dict()``-style names."""
        found = {}
        for kind in ("_parameters", "_buffers"):
            for name, tensor in (self.state.get(kind) or {}).items():
                if tensor is not None:
                    found[prefix + name] = tensor.detach()
        for name, child in (self.state.get("_modules") or {}).items():
            if isinstance(child, PersistentRecord):
                found.update(child.tensors(f"{prefix}{name}."))
            elif child is not None:
                raise CheckpointUnreadable(f"{prefix}{name}: a sub-network that is not an NVlabs persistent object")
        return found


class AttributeDict(dict):
    """Stands in for ``dnnlib.EasyDict`` (a dict whose keys are also attributes) as a plain dict."""


def _persistent_object(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise CheckpointUnreadable("a persistent object without a recorded class state")
    return PersistentRecord(str(meta.get("class_name")), meta["state"])


def _storage_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): AttributeDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickle(f"it asks to import {module}.{name}; only tensors and plain containers are read from "
                               f"NVlabs pickles, and nothing in them is run") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("it holds external references (not an NVlabs network pickle)")


def read_pickle(data: bytes, url: str) -> dict[str, Any]:
    """The top-level dict of an NVlabs pickle (``G``, ``D``, ``G_ema``, ... as ``PersistentRecord``s)."""
    try:
        top = _RestrictedUnpickler(io.BytesIO(data)).load()
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
