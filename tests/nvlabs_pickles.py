"""NVlabs-format pickles crafted as an attacker would hand-make them, opcode by opcode (no NVlabs code).

Pickles that daskgan must accept are tested with files NVlabs' code wrote (``fixtures/nvlabs-pkl-16-cond``);
these are attacks on the loader, which are by nature hand-made. NVlabs' persistence pickles each network object as
the call ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, ``meta`` holding the class name and the
object's state (``_init_kwargs``, ``_parameters``, ...), inside a top-level dict (``G``, ``G_ema``, ``D``, ...).
"""

from __future__ import annotations

import pickle
import pickletools

import torch

RECONSTRUCT = b"c" + b"torch_utils.persistence\n_reconstruct_persistent_obj\n"  # GLOBAL


def pushed(value: object) -> bytes:
    """The opcodes that push ``value`` (plain containers, strings, numbers, tensors): no PROTO, no STOP."""
    return pickletools.optimize(pickle.dumps(value, protocol=3))[2:-1]  # no memo: fragments are independent


def crafted_network(init_kwargs: dict, parameters: dict[str, torch.Tensor] | None = None) -> bytes:
    """The opcodes of one persistent network object declaring ``init_kwargs`` and holding ``parameters``."""
    meta = {"type": "class", "version": 4, "module_src": "", "class_name": "training.networks.Generator",
            "state": {"_init_kwargs": init_kwargs, "_parameters": parameters or {}, "_buffers": {}, "_modules": {}}}
    return RECONSTRUCT + pushed(meta) + pickle.TUPLE1 + pickle.REDUCE


def crafted_pickle(networks: dict[str, bytes]) -> bytes:
    """A pickle of protocol 3 (as NVlabs' released ones) holding the dict ``{name: network}``."""
    items = b"".join(pushed(name) + network for name, network in networks.items())
    return pickle.PROTO + b"\x03" + pickle.EMPTY_DICT + pickle.MARK + items + pickle.SETITEMS + pickle.STOP


def generator_kwargs(z_dim: int, w_dim: int, mapping_layers: int = 2) -> dict:
    """A 16 px unconditional StyleGAN2-ADA generator's ``init_kwargs`` (as NVlabs' training records them)."""
    return {"z_dim": z_dim, "w_dim": w_dim, "c_dim": 0, "img_resolution": 16, "img_channels": 3,
            "mapping_kwargs": {"num_layers": mapping_layers},
            "synthesis_kwargs": {"channel_base": 2048, "channel_max": 64, "num_fp16_res": 0, "conv_clamp": 256}}


def crafted_module(module: str, name: str, state: dict[str, bytes], arguments: bytes = pickle.EMPTY_TUPLE) -> bytes:
    """The opcodes of a torch module pickled as itself (R3GAN's networks): ``module.name`` made by ``NEWOBJ``
    with ``arguments`` and given ``state`` (its values already opcodes) by ``BUILD``."""
    items = b"".join(pushed(key) + value for key, value in state.items())
    return (b"c" + f"{module}\n{name}\n".encode() + arguments + pickle.NEWOBJ + pickle.EMPTY_DICT + pickle.MARK
            + items + pickle.SETITEMS + pickle.BUILD)
