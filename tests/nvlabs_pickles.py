"""NVlabs-format network pickles built from the format itself, for tests (no NVlabs code).

NVlabs' ``torch_utils/persistence.py`` pickles each network object as a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = {type: 'class', version, module_src,
class_name, state}``, ``state`` being the module's ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``,
``_init_kwargs``, ...). Here ``module_src`` is code that would leave a marker file if anything ran it.
"""

from __future__ import annotations

import collections
import pickle
import sys
import types
from pathlib import Path

import torch

PERSISTENCE = "torch_utils.persistence"


def _persistence_module() -> types.ModuleType:
    """A stand-in module, so pickle can name ``torch_utils.persistence._reconstruct_persistent_obj``."""
    if PERSISTENCE not in sys.modules:
        package, module = types.ModuleType("torch_utils"), types.ModuleType(PERSISTENCE)

        def _reconstruct_persistent_obj(meta):
            raise AssertionError("the test's stand-in must never be called")

        _reconstruct_persistent_obj.__module__ = PERSISTENCE
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        module._reconstruct_persistent_obj = _reconstruct_persistent_obj
        package.persistence = module
        sys.modules.update({"torch_utils": package, PERSISTENCE: module})
    return sys.modules[PERSISTENCE]


class Persistent:
    """One pickled network object: NVlabs' ``__reduce__`` shape."""

    def __init__(self, class_name: str, state: dict, marker: Path):
        self.class_name, self.state, self.marker = class_name, state, marker

    def __reduce__(self):
        source = f"open({str(self.marker)!r}, 'w').write('NVlabs source ran')\n"
        meta = {"type": "class", "version": 4, "module_src": source, "class_name": self.class_name,
                "state": self.state}
        return _persistence_module()._reconstruct_persistent_obj, (meta,)


def network(flat: dict[str, torch.Tensor], class_name: str, init_kwargs: dict, marker: Path) -> Persistent:
    """A persistent object tree holding ``flat`` (a ``state_dict``), sub-objects split at the dots."""
    tree: dict = {}
    for name, tensor in flat.items():
        *path, leaf = name.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = tensor
    return _node(tree, class_name, init_kwargs, marker)


def _node(tree: dict, class_name: str, init_kwargs: dict, marker: Path) -> Persistent:
    parameters, buffers, modules = collections.OrderedDict(), collections.OrderedDict(), collections.OrderedDict()
    for name, value in tree.items():
        if isinstance(value, dict):
            modules[name] = _node(value, f"training.networks.{name}", {}, marker)
        elif name in ("w_avg", "noise_const", "resample_filter"):
            buffers[name] = value
        else:
            parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    return Persistent(class_name, {"training": False, "_parameters": parameters, "_buffers": buffers,
                                   "_modules": modules, "_init_kwargs": init_kwargs, "_init_args": ()}, marker)


def nvlabs_pickle(folder: Path, marker: Path) -> bytes:
    """A pickle as NVlabs' training writes one (G, G_ema, D, augment_pipe), from a shared/parity folder."""
    import json

    kwargs = json.loads((folder / "init_kwargs.json").read_text())
    G = network(torch.load(folder / "G_state.pt"), "training.networks.Generator", kwargs["G"], marker)
    D = network(torch.load(folder / "D_state.pt"), "training.networks.Discriminator", kwargs["D"], marker)
    return pickle.dumps({"G": G, "D": D, "G_ema": G, "augment_pipe": None,
                         "training_set_kwargs": {"resolution": kwargs["G"]["img_resolution"]}}, protocol=4)
