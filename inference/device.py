"""Which torch device to run on: one rule for the worker and the medgru commands (train, evaluate, calibrate).

Kept apart from :mod:`inference.api` so that the packages which read model cards without running models
(reporting) need not import torch.
"""

from __future__ import annotations


def resolve_device(device: str | None) -> str:
    """The torch device to run on: ``auto`` (or empty) is ``cuda`` where torch sees a GPU, else ``cpu``;
    ``cuda`` / ``cuda:N`` where torch sees none is a :class:`ValueError` that says so (rather than torch's
    error at the first tensor moved); other values (``cpu``) pass through."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} sees no CUDA GPU on this machine "
                         "(use cpu or auto)")
    return device
