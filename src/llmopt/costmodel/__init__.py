"""Cost models the partitioner calls. ``aie2``: the AMD Phoenix NPU (XDNA1), which this machine cannot reach, so
every number it gives is a prediction (``predicted: True``); ``counts``: FLOP and byte counts of the NPU kernels.

    from llmopt.costmodel import predict_kernel, describe
    predict_kernel("qgemv", {"M": 1, "N": 3584, "K": 3584, "G": 128}, bits=4)["seconds"]

    python -m llmopt.costmodel     # prints the model's constants and a decode-step table for the seed models
"""

from llmopt.costmodel.aie2 import PHOENIX, Aie2Spec, describe, npu_ceilings, predict_kernel, predict_layer, tiling
from llmopt.costmodel.counts import kernel_counts

__all__ = ["PHOENIX", "Aie2Spec", "describe", "kernel_counts", "npu_ceilings", "predict_kernel", "predict_layer",
           "tiling"]
