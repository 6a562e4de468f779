"""The worker process's model registry: which models exist, which one covers a sequence, loaded once.

Model folders come from ``settings.model`` (each entry a model folder or a folder of model folders, in
priority order). Cards are read once, at first use; a folder whose card cannot be read is logged and
left out (it never takes the worker down). Detectors are loaded lazily, on the first sequence that
needs them, and cached for the life of the process.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from inference.api import Detector, ModelCard, discover_model_dirs, hidden_models, load_model, select_model
from inference.device import resolve_device

log = logging.getLogger(__name__)


__all__ = ["ModelRegistry", "resolve_device"]


class ModelRegistry:
    """Per-process cache of model cards and loaded detectors."""

    def __init__(self, model_paths, *, verify: bool = True, device: str = "auto"):
        self._paths = [Path(p) for p in model_paths]
        self._verify = verify
        self._device = device
        self._cards: list[tuple[Path, ModelCard]] | None = None
        self._detectors: dict[Path, Detector] = {}
        self._lock = threading.Lock()
        self.errors: dict[Path, str] = {}

    @classmethod
    def from_settings(cls, settings) -> "ModelRegistry":
        return cls(settings.model, device=settings.device)

    # ---------------------------------------------------------------------------------- cards
    @property
    def cards(self) -> list[tuple[Path, ModelCard]]:
        """``(model folder, card)`` for every readable model, in ``settings.model`` order."""
        with self._lock:
            if self._cards is None:
                cards: list[tuple[Path, ModelCard]] = []
                for d in discover_model_dirs(self._paths):
                    try:
                        cards.append((d, ModelCard.read(d)))
                    except (OSError, ValueError, KeyError, TypeError) as exc:
                        self.errors[d] = f"{type(exc).__name__}: {exc}"
                        log.error("model folder %s left out: its card cannot be read (%s)", d, exc)
                self._cards = cards
                log.info("models available: %s", ", ".join(f"{c.name} {c.version}" for _, c in cards) or "none")
                for path, card, by in hidden_models(cards):
                    log.warning("model %s %s (%s) is never used: %s, before it in MEDGRU_MODEL (folders of "
                                "models in name order), cover%s its whole scope; list the model to serve first",
                                card.name, card.version, path,
                                ", ".join(f"{c.name} {c.version} ({p})" for p, c in by), "s" if len(by) == 1 else "")
            return list(self._cards)

    def select(self, modality: str, body_part: str) -> tuple[Path, ModelCard] | None:
        """The first model whose scope covers ``modality``/``body_part``, or ``None``."""
        return select_model(self.cards, modality, body_part)

    # ------------------------------------------------------------------------------ detectors
    def get(self, model_dir: Path) -> Detector:
        """The loaded detector of ``model_dir`` (loaded and checksum-verified on first use)."""
        model_dir = Path(model_dir)
        with self._lock:
            det = self._detectors.get(model_dir)
            if det is None:
                det = load_model(model_dir, verify=self._verify)
                device = resolve_device(self._device)
                if hasattr(det, "to"):  # detectors that run torch accept a device
                    det.to(device)
                self._detectors[model_dir] = det
                log.info("loaded model %s %s from %s on %s", det.card.name if det.card else "?",
                         det.card.version if det.card else "?", model_dir, device)
            return det

    def add(self, model_dir: Path, detector: Detector) -> None:
        """Put an already-loaded detector in the cache (its folder must hold its card)."""
        model_dir = Path(model_dir)
        with self._lock:
            if detector.card is None:
                detector.card = ModelCard.read(model_dir)
            self._detectors[model_dir] = detector
            if self._cards is not None and all(p != model_dir for p, _ in self._cards):
                self._cards.append((model_dir, detector.card))

    def describe(self) -> str:
        return ", ".join(f"{c.name} {c.version} ({'/'.join(c.scope.modalities)})" for _, c in self.cards) or "none"
