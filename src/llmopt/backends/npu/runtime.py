"""Run compiled IREE modules (``.vmfb``) on the CPU through the IREE runtime (``local-task`` driver).

    mod = IreeModule(path)                  # one compiled kernel
    w = upload(np_array)                    # a device buffer kept across calls (weights)
    y = mod(x, w, ...)                      # numpy in, list of numpy out

Arguments are numpy arrays or uploaded buffers; uint8/uint16 arrays are passed as the signless i8/i16 the
kernels declare. Every module shares one device (one thread pool).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from llmopt.errors import LlmoptError

DRIVER = "local-task"


@functools.cache
def _config():
    try:
        import iree.runtime as rt
    except ImportError as err:
        raise LlmoptError(f"iree-cpu: the IREE runtime is not installed (pip install iree-base-runtime; {err})") from None
    return rt.Config(DRIVER)


def upload(array: np.ndarray):
    """A device copy of ``array`` that later calls reuse (weights): no per-call copy."""
    import iree.runtime as rt

    return rt.asdevicearray(_config().device, _signless(np.ascontiguousarray(array)))


class IreeModule:
    """One compiled kernel module, loaded once; calling it runs ``@main``."""

    def __init__(self, path: str | Path, function: str = "main"):
        import iree.runtime as rt

        self.path = Path(path)
        config = _config()
        self._ctx = rt.SystemContext(config=config)
        try:
            self._ctx.add_vm_module(rt.VmModule.copy_buffer(self._ctx.instance, self.path.read_bytes()))
        except FileNotFoundError:
            raise LlmoptError(f"{self.path}: compiled module not found") from None
        except (RuntimeError, ValueError) as err:
            raise LlmoptError(f"{self.path}: not a loadable IREE module ({str(err).splitlines()[0]})") from None
        self._fn = self._ctx.modules.module[function]

    def __call__(self, *args) -> list[np.ndarray]:
        args = [_signless(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in args]
        try:
            out = self._fn(*args)
        except (RuntimeError, ValueError) as err:
            raise LlmoptError(f"{self.path.name}: IREE call failed ({str(err).splitlines()[0]})") from None
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [o.to_host() for o in outs]


def _signless(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.view(np.int8)
    if a.dtype == np.uint16:
        return a.view(np.int16)
    if a.dtype == np.bool_:
        return a.view(np.int8)
    return a
