"""The U-Net in PyTorch, and reading its weights from a model folder.

The only module of segmentation that imports torch (with ``predict.TorchPredictor``): a model folder with
an up-to-date ONNX export is segmented without it (``predict.onnx_predictor``), which saves PyTorch's
start-up of about 2 s in every run.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
from torch import nn

from nucleiseg.config import ModelConfig


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``depth`` 2x down-samplings and skip connections.

    Parameters
    ----------
    in_channels, out_channels : int
    base_channels : int
        Channels of the first level; each level down doubles them.
    depth : int
        Number of down-samplings. Input height and width must be multiples of ``grid * 2**depth``.
    grid : int
        The U-Net runs on a grid ``grid`` times coarser than the input: each grid cell's ``grid x grid``
        input pixels become its channels (no information is thrown away), and the logits are upsampled
        bilinearly to the input's size. 2 costs a quarter of the arithmetic of 1.

    Input (B, in_channels, H, W) float; output (B, out_channels, H, W) logits.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 3, base_channels: int = 16, depth: int = 4,
                 grid: int = 1):
        super().__init__()
        if depth < 1 or base_channels < 1 or grid < 1:
            raise ValueError(f"depth, base_channels and grid must be positive, got {depth}, {base_channels}, {grid}")
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.depth, self.grid = depth, grid
        self.down = nn.ModuleList([_conv_block(in_channels * grid**2, widths[0])])
        self.down.extend(_conv_block(widths[i], widths[i + 1]) for i in range(depth))
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth))
        self.up = nn.ModuleList(_conv_block(2 * widths[i], widths[i]) for i in range(depth))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2**self.depth * self.grid
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} is not a multiple of {multiple}; pad it to "
                f"{tuple(-(-s // multiple) * multiple for s in x.shape[-2:])}"
            )
        if self.grid > 1:
            x = nn.functional.pixel_unshuffle(x, self.grid)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(self.depth)):
            x = self.up[i](torch.cat([skips.pop(), self.upsample[i](x)], dim=1))
        x = self.head(x)
        if self.grid > 1:
            x = nn.functional.interpolate(x, scale_factor=self.grid, mode="bilinear", align_corners=False)
        return x


class ShuffleUpsample(nn.Module):
    """The ``ConvTranspose2d`` of kernel 2 and stride 2 that ``UNet`` upsamples with, as a 1x1 convolution to four
    times the channels and a pixel shuffle: the same function (each input pixel makes its own 2x2 block), in a
    form that onnxruntime's 8-bit quantisation runs in integers; it leaves a transposed convolution in float32
    between conversions (a sixth of the 8-bit network's time)."""

    def __init__(self, upsample: nn.ConvTranspose2d):
        super().__init__()
        shape = (upsample.kernel_size, upsample.stride, upsample.padding, upsample.output_padding, upsample.dilation)
        if shape != ((2, 2), (2, 2), (0, 0), (0, 0), (1, 1)) or upsample.groups != 1 or upsample.bias is None:
            raise ValueError(f"only a plain 2x2 transposed convolution of stride 2 is a pixel shuffle, not {upsample}")
        inputs, outputs = upsample.in_channels, upsample.out_channels
        self.conv = nn.Conv2d(inputs, 4 * outputs, 1).to(upsample.weight)
        with torch.no_grad():  # output channel c * 4 + 2 * dy + dx is pixel (dy, dx) of channel c's block
            self.conv.weight.copy_(upsample.weight.permute(1, 2, 3, 0).reshape(4 * outputs, inputs, 1, 1))
            self.conv.bias.copy_(upsample.bias.repeat_interleave(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_shuffle(self.conv(x), 2)


def with_shuffle_upsampling(network: UNet) -> UNet:
    """A copy of ``network`` computing the same function with ``ShuffleUpsample`` layers (for the 8-bit export)."""
    shuffled = copy.deepcopy(network)
    shuffled.upsample = nn.ModuleList(ShuffleUpsample(upsample) for upsample in network.upsample)
    return shuffled


def select_device(name: str = "auto") -> torch.device:
    """"auto" -> CUDA if PyTorch sees a GPU, else Apple's MPS if present, else the CPU; a named device
    that is not there is an error that says so."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name not in available:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or mps")
    if not available[name]:
        raise ValueError(f"device {name!r} is not available here (PyTorch sees no such device); use auto or cpu")
    return torch.device(name)


def build_model(cfg: ModelConfig) -> UNet:
    return UNet(cfg.in_channels, cfg.out_channels, cfg.base_channels, cfg.depth, cfg.grid)


def weights_digest(network: nn.Module) -> str:
    """A short hash of a network's weights: names what a record or an ONNX export was made with."""
    digest = hashlib.sha1()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_network(weights: Path, architecture: str, config: ModelConfig) -> nn.Module:
    """The network of ``architecture`` and ``config`` with the weights of ``weights`` (weights.pt), strictly:
    an unreadable file or weights that do not fit raise ValueError saying so."""
    if architecture != "unet":  # model.ARCHITECTURES
        raise ValueError(f"unknown architecture {architecture!r}")
    network = build_model(config)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, empty, truncated or not a PyTorch file: torch raises many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{weights}: not a readable weights file ({reason})") from None
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:  # a torch error lists every mismatch on its own line
        details = "; ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip())
        raise ValueError(f"{weights}: does not match the network of model.json ({details or exc})") from None
    return network.eval()
