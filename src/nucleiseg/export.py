"""Exporting a model for other runtimes: ONNX (run by ``--engine onnx`` with onnxruntime, or any ONNX runtime)."""

from __future__ import annotations

import os

import torch

from nucleiseg.io import atomic_path
from nucleiseg.model import ModelBundle

ONNX_FILE = "model.onnx"  # where the onnx engine looks for it in a model folder
ONNX_OPSET = 17


def export_onnx(model: ModelBundle, out: str | os.PathLike) -> None:
    """Write the network as ONNX, atomically: input ``input`` (B, C, H, W) float32, output ``logits``
    (B, K, H, W), batch, height and width dynamic (H and W multiples of ``model.size_multiple``).

    The TorchScript-based exporter is used (``dynamo=False``): the dynamo one needs onnxscript, and the
    U-Net has no control flow that tracing would miss (its size check holds for every valid input).
    """
    network = model.network.eval().cpu()
    side = 4 * model.size_multiple
    example = torch.zeros(1, model.config.in_channels, side, side)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    with atomic_path(out) as tmp:
        torch.onnx.export(network, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": dynamic, "logits": dynamic}, opset_version=ONNX_OPSET,
                          dynamo=False)
