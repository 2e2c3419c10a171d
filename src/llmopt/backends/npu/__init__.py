"""The NPU target (AMD Phoenix, XDNA1 "npu1") and its CPU stand-in, ``iree-cpu``.

The kernels are MLIR templates in ``kernels/`` (catalogue: ``kernels.py``). ``compile.py`` renders and compiles
them with IREE: for the NPU when the iree-amd-aie plugin is present, otherwise for ``llvm-cpu``. ``runtime.py``
runs compiled modules through the IREE runtime, ``iree_cpu.py`` is the ``iree-cpu`` backend (the kernels doing
the ops they cover inside the CPU backend), ``xrt.py`` the ``npu`` backend over pyxrt. docs/NPU.md explains
what runs where and how to enable the real device.
"""
