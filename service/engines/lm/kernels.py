"""The decode step's fused CPU kernels (csrc/decode_step.cpp), compiled on this machine.

They are built with the system's C++ compiler the first time they are asked for, for the vector
instructions PyTorch itself uses on this CPU, and cached by torch.utils.cpp_extension (under
$TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions; about 20 s on 2 cores, once).
`make setup` builds them ahead (`amserve kernels`). Where they cannot be
built (no compiler), `load()` says why once and returns None, and the model runs its decode step on
PyTorch ops (model.py), which compute the same thing.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode_step.cpp"

# Compiler flags for PyTorch's CPU capability; CPU_CAPABILITY selects ATen's matching Vectorized.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def capability() -> str:
    """AVX512, AVX2 or DEFAULT (portable code): what the kernels are built for here."""
    named = torch.backends.cpu.get_cpu_capability()
    return next((name for name in _CAPABILITY_FLAGS if named.startswith(name)), "DEFAULT")


@functools.cache
def load() -> ModuleType | None:
    """The kernels' module, built if needed; None (logged once) where they cannot be built."""
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - any build failure leaves the PyTorch path
        log.warning("fused decode kernels unavailable, the decode step runs on PyTorch ops: %s",
                    str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__)
        return None


def runnable_capabilities() -> list[str]:
    """The builds this CPU can run: its own and the narrower ones."""
    order = ["DEFAULT", *reversed(_CAPABILITY_FLAGS)]
    return order[:order.index(capability()) + 1]


def build(verbose: bool = False, cpu: str | None = None) -> ModuleType:
    """Build (or find built) the kernels for `cpu`, by default this CPU's capability."""
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    cpu = cpu or capability()
    flags = ["-O3", "-fopenmp-simd", f"-DCPU_CAPABILITY={cpu}", f"-DCPU_CAPABILITY_{cpu}",
             *_CAPABILITY_FLAGS.get(cpu, [])]
    return cpp_extension.load(name=f"amserve_decode_step_{cpu.lower()}", sources=[str(SOURCE)],
                              extra_cflags=flags, verbose=verbose)


def _put_ninja_on_path() -> None:
    """torch builds with the `ninja` on PATH; the `ninja` wheel's is in the environment's bin/,
    which is not on PATH when the interpreter is started by its full path."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")


def run(args: argparse.Namespace) -> int:
    """`amserve kernels`: build them now (a failure is an error here, not a fallback)."""
    build(verbose=args.verbose)
    print(f"decode kernels ready ({capability()})")
    return 0
