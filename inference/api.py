"""The detector interface: the one place where the pipeline and the models meet.

Inputs and outputs are plain typed values (numpy arrays and dataclasses), so the listener, the worker,
the training CLI and the tests all speak the same language, and no detector needs to know about DICOM
networking, the queue or the database.

* :class:`FrameSequence` — what the pipeline hands a detector: ``T`` ordered greyscale frames.
* :class:`Detection` — what a detector returns: score, threshold, verdict, optional cluster label and a
  heat map per frame.
* :class:`ModelCard` — ``card.json`` in every model folder: who the model is and which sequences it may
  score (:class:`Scope`).
* :class:`Detector` — the abstract base every detector implements; :func:`register_detector` adds a class
  to the registry, :func:`load_model` builds one from a model folder.
* :func:`conformal_threshold` — the split-conformal threshold every detector calibrates with (at
  training, and again on a site's own normals by ``medgru calibrate``).
* :meth:`Detector.series_threshold` — the threshold for a series of T frames, each scored alone: the
  calibration normals' conformal quantile at ``target_fpr / T`` (Bonferroni), so that a series of T normal
  frames is flagged with probability at most ``target_fpr`` however its frames depend on each other.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence, TypeVar

import numpy as np

CARD_FILENAME = "card.json"
#: the calibration normals' scores behind a model's threshold (:meth:`Detector.calibrate`); optional in a
#: model folder, verified by its checksum like every listed file
CALIBRATION_FILENAME = "calibration.json"
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"


# --------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class FrameSequence:
    """An ordered stack of greyscale frames from one series (or a prior + current pair).

    ``frames`` is float32 of shape ``(T, H, W)`` with values in ``[0, 1]``: the modality LUT and the VOI
    (window) already applied, MONOCHROME1 already inverted, but no resampling and no contrast
    enhancement; that is the detector's own preprocessing. ``T >= 1``; a single radiograph is ``T = 1``.
    ``bits_stored`` tells the detector the bit depth the frames came from (8 for JPEG training data,
    12 to 16 for most DICOM). A detector must preprocess a frame as it preprocessed its training data:
    MedGRU-SVC runs CLAHE at no more than the depth it was trained at (``MedGRUSVC.clahe_bits``).
    """

    frames: np.ndarray
    modality: str = ""
    body_part: str = ""
    bits_stored: int = 8
    series_uid: str = ""
    frame_refs: tuple[tuple[str, int], ...] = ()  # (SOP Instance UID, 1-based frame number) per frame
    #: how many leading frames are context only (a prior study's frames, prepended by the assembler): the
    #: ConvGRU reads them, the verdict judges the frames after them (:attr:`judged`)
    context_frames: int = 0

    def __post_init__(self) -> None:
        f = self.frames
        if not isinstance(f, np.ndarray):
            raise TypeError(f"frames must be a numpy array, not {type(f).__name__}")
        if f.ndim != 3:
            raise ValueError(f"frames must have shape (T, H, W), got {f.shape}")
        if f.shape[0] < 1 or f.shape[1] < 2 or f.shape[2] < 2:
            raise ValueError(f"frames shape {f.shape} is empty or degenerate")
        if f.dtype != np.float32:
            raise TypeError(f"frames must be float32, got {f.dtype}")
        if not np.isfinite(f).all():
            raise ValueError("frames contain NaN or infinity")
        if f.min() < 0.0 or f.max() > 1.0:
            raise ValueError(f"frames must lie in [0, 1], got [{f.min()}, {f.max()}]")
        if self.frame_refs and len(self.frame_refs) != f.shape[0]:
            raise ValueError(f"{len(self.frame_refs)} frame_refs for {f.shape[0]} frames")
        if not 0 <= int(self.context_frames) < f.shape[0]:
            raise ValueError(f"context_frames must lie in [0, {f.shape[0]}) for {f.shape[0]} frames, "
                             f"got {self.context_frames}")

    @property
    def length(self) -> int:
        return int(self.frames.shape[0])

    @property
    def judged(self) -> range:
        """The indices of the frames the verdict judges: all but the leading context frames."""
        return range(int(self.context_frames), self.length)


# -------------------------------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class Detection:
    """A detector's finding for one sequence.

    ``score`` grows with abnormality; ``is_anomaly`` is ``score > threshold``. ``heatmaps`` is float32
    ``(T, H, W)`` in ``[0, 1]``, aligned with the input frames (same T, H, W). ``cluster_label`` names the
    anomaly type found by support-vector clustering, or is ``None`` (normal, or a detector without one).

    For ``T > 1`` every frame is also scored alone (``frame_scores``, one per frame), as the models were
    trained and calibrated on single images. The series' ``score`` is then the highest score among the
    judged frames (:attr:`FrameSequence.judged`) and ``threshold`` is :meth:`Detector.series_threshold` of
    their number, so that the verdict keeps the target false-positive rate.
    """

    score: float
    threshold: float
    is_anomaly: bool
    heatmaps: np.ndarray
    model_name: str
    model_version: str
    cluster_label: str | None = None
    frame_scores: tuple[float, ...] = ()
    extras: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not np.isfinite(self.score):
            raise ValueError(f"score must be finite, got {self.score}")
        if not np.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold}")
        if bool(self.is_anomaly) != bool(self.score > self.threshold):
            raise ValueError(
                f"verdict {self.is_anomaly} disagrees with score {self.score} vs threshold {self.threshold}"
            )
        h = self.heatmaps
        if not isinstance(h, np.ndarray) or h.ndim != 3 or h.dtype != np.float32:
            raise ValueError("heatmaps must be a float32 array of shape (T, H, W)")
        if h.size and (h.min() < 0.0 or h.max() > 1.0 or not np.isfinite(h).all()):
            raise ValueError("heatmaps must lie in [0, 1]")

    @property
    def verdict(self) -> str:
        return "abnormal" if self.is_anomaly else "normal"


# ---------------------------------------------------------------------------------------- model cards
@dataclass(frozen=True)
class Scope:
    """Which sequences a model may score. Empty ``body_parts`` means any body part of those modalities."""

    modalities: tuple[str, ...]
    body_parts: tuple[str, ...] = ()
    description: str = ""

    def covers(self, modality: str, body_part: str) -> bool:
        mod = (modality or "").strip().upper()
        if mod not in {m.upper() for m in self.modalities}:
            return False
        if not self.body_parts:
            return True
        part = (body_part or "").strip().upper()
        return part in {b.upper() for b in self.body_parts}


@dataclass(frozen=True)
class ModelCard:
    """The contents of ``card.json``: identity, scope, provenance and measured performance."""

    name: str
    version: str
    detector: str  # registry key of the Detector class that loads this folder
    scope: Scope
    description: str = ""
    intended_use: str = ""
    limitations: tuple[str, ...] = ()
    training_data: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)  # file name -> sha256
    params: Mapping[str, Any] = field(default_factory=dict)  # detector-specific
    #: set by ``medgru calibrate``: the threshold re-set on a site's normals (n, target FPR, old and new
    #: threshold, source, date, ...); empty for a model as trained. Written to card.json only when set.
    calibration: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelCard":
        for key in ("name", "version", "detector", "scope"):
            if key not in d:
                raise ValueError(f"model card lacks {key!r}")
        scope = d["scope"]
        return cls(
            name=str(d["name"]),
            version=str(d["version"]),
            detector=str(d["detector"]),
            scope=Scope(
                modalities=tuple(scope.get("modalities", ())),
                body_parts=tuple(scope.get("body_parts", ())),
                description=str(scope.get("description", "")),
            ),
            description=str(d.get("description", "")),
            intended_use=str(d.get("intended_use", "")),
            limitations=tuple(d.get("limitations", ())),
            training_data=str(d.get("training_data", "")),
            metrics=dict(d.get("metrics", {})),
            files=dict(d.get("files", {})),
            params=dict(d.get("params", {})),
            calibration=dict(d.get("calibration", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scope"] = asdict(self.scope)
        if not d["calibration"]:  # cards of uncalibrated models stay as they were
            del d["calibration"]
        return d

    @classmethod
    def read(cls, model_dir: Path) -> "ModelCard":
        path = Path(model_dir) / CARD_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no {CARD_FILENAME}")
        return cls.from_dict(json.loads(path.read_text()))

    def write(self, model_dir: Path) -> None:
        (Path(model_dir) / CARD_FILENAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_model_files(model_dir: Path, card: ModelCard, required: Iterable[str] = ()) -> None:
    """Raise ``ValueError`` if the card lists no files, leaves one of ``required`` (the files the detector
    loads: :attr:`Detector.MODEL_FILES`) or the optional :data:`CALIBRATION_FILENAME` where the folder has
    it unlisted, or a listed file is missing or its checksum differs.
    Checking only the listed files let a card without ``svdd.npz`` (or with ``files: {}``) load a head
    whose threshold anyone had changed."""
    if not card.files:
        raise ValueError(f"model {card.name}: the card lists no files with checksums; nothing in {model_dir} "
                         "can be verified")
    for name in required:
        if name not in card.files:
            raise ValueError(f"model {card.name}: {name} is not listed with a checksum in the card, and the "
                             f"{card.detector} detector loads it; refusing an unverified file")
    if (Path(model_dir) / CALIBRATION_FILENAME).is_file() and CALIBRATION_FILENAME not in card.files:
        raise ValueError(f"model {card.name}: {CALIBRATION_FILENAME} is not listed with a checksum in the card; "
                         "refusing an unverified file")
    for name, digest in card.files.items():
        path = Path(model_dir) / name
        if not path.is_file():
            raise ValueError(f"model {card.name}: file {name} is missing from {model_dir}")
        actual = sha256_file(path)
        if actual != digest:
            raise ValueError(f"model {card.name}: checksum of {name} is {actual}, card says {digest}")


# -------------------------------------------------------------------------------------- calibration
def conformal_rank(n: int, alpha: float) -> int:
    """The 1-based rank ``ceil((n + 1)(1 - alpha))`` of the split-conformal threshold among ``n`` sorted
    calibration scores (it may exceed ``n``: then there are too few scores for the guarantee)."""
    return int(math.ceil((int(n) + 1) * (1.0 - float(alpha))))


def conformal_threshold(calibration_scores: Sequence[float] | np.ndarray, alpha: float) -> float:
    """Split-conformal threshold: the ``ceil((n + 1)(1 - alpha))``-th smallest calibration score, so that a
    new exchangeable normal exceeds it with probability at most ``alpha`` (the target false-positive
    rate). With too few scores for that rank the largest score is used (and the guarantee is weaker:
    see :func:`conformal_min_normals`)."""
    s = np.sort(np.asarray(calibration_scores, dtype=np.float64))
    n = s.size
    if n == 0:
        raise ValueError("conformal calibration needs at least one normal score")
    k = conformal_rank(n, alpha)
    return float(s[min(max(k, 1), n) - 1])


def conformal_min_normals(alpha: float) -> int:
    """The fewest calibration normals for which the conformal rank is a real score (rank <= n), i.e.
    ``ceil(1 / alpha) - 1``: 19 at ``alpha = 0.05``. Computed with :func:`conformal_rank` itself, so the
    two always agree."""
    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha (target false-positive rate) must lie in (0, 1), got {alpha}")
    n = max(1, math.ceil(1.0 / a) - 1)
    while conformal_rank(n, a) > n:  # guard against floating-point rounding of 1 / alpha
        n += 1
    while n > 1 and conformal_rank(n - 1, a) <= n - 1:
        n -= 1
    return n


def conformal_exceedance_bound(n: int, alpha: float) -> float:
    """The bound on the probability that a new exchangeable normal exceeds the conformal threshold of ``n``
    scores at ``alpha``: ``(n + 1 - k) / (n + 1)`` with ``k`` the rank actually used (the largest score
    where the conformal rank exceeds ``n``). It is at most ``alpha`` when the rank is a real score."""
    n = int(n)
    if n < 1:
        raise ValueError("the bound needs at least one calibration score")
    k = min(max(conformal_rank(n, alpha), 1), n)
    return (n + 1 - k) / (n + 1)


def conformal_longest_series(n: int, alpha: float) -> int:
    """The most frames a series may have for the conformal rank at ``alpha / T`` to lie within ``n`` scores
    (``T <= alpha (n + 1)``), at least 1: the longest series :meth:`Detector.series_threshold` covers
    at ``alpha``. :func:`conformal_min_normals` of ``alpha / T`` is the inverse: the normals T needs."""
    t = 1
    while conformal_rank(n, alpha / (t + 1)) <= n:
        t += 1
    return t


def _checked_calibration(scores: Sequence[float] | np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """``(sorted scores, alpha)`` of a calibration, or ``ValueError``: no score, a non-finite one, or a
    target false-positive rate outside (0, 1)."""
    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha (target false-positive rate) must lie in (0, 1), got {alpha}")
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0 or not np.isfinite(s).all():
        raise ValueError("calibration needs at least one score, all finite")
    return s, a


# ------------------------------------------------------------------------------------------ detectors
class Detector(abc.ABC):
    """Base class of every detector. Subclasses register with :func:`register_detector`.

    A detector is built untrained (``__init__`` takes its hyper-parameters), trained by ``fit`` on normal
    sequences, saved to a folder with ``save`` and loaded back with ``load``. ``detect`` scores one
    sequence; ``score_batch`` scores many at once (no heat maps) for evaluation.
    """

    registry_name: ClassVar[str] = ""
    #: constructor keyword arguments for a tiny, fast configuration: the contract test builds
    #: ``cls(**cls.SMALL_PARAMS)`` and fits it on a handful of synthetic sequences.
    SMALL_PARAMS: ClassVar[dict[str, Any]] = {}
    #: the files ``load`` reads from a model folder: :func:`load_model` with ``verify`` refuses a card
    #: that does not list each of them with its checksum
    MODEL_FILES: ClassVar[tuple[str, ...]] = ()

    card: ModelCard | None = None
    #: the decision threshold on the score (``None`` until fitted or loaded); every detector keeps it here
    #: and persists it in ``save``, so :meth:`set_threshold` works for all of them
    _threshold: float | None = None
    #: the sorted scores of the held-out normal images (T = 1) the threshold is the conformal quantile of,
    #: and its target false-positive rate (:meth:`calibrate`); ``None`` for a threshold set by hand or a
    #: model folder from before they were kept (then :meth:`series_threshold` cannot adjust for T)
    _calibration_scores: np.ndarray | None = None
    _calibration_alpha: float | None = None

    def get_params(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-serialisable): ``type(self)(**self.get_params())`` builds
        an untrained twin. Saved as the model card's ``params``; cross-validation relies on it."""
        return {}

    @abc.abstractmethod
    def fit(self, normals: Sequence[FrameSequence], *, validation: Sequence[FrameSequence] = (),
            seed: int = 0) -> None:
        """Train on normal sequences only; calibrate the threshold on ``validation`` normals."""

    @abc.abstractmethod
    def score_batch(self, sequences: Sequence[FrameSequence]) -> np.ndarray:
        """Anomaly scores (float64, shape ``(N,)``), larger = more abnormal. No heat maps."""

    @abc.abstractmethod
    def detect(self, sequence: FrameSequence, *, explain: bool = True) -> Detection:
        """Score one sequence; with ``explain`` also compute the per-frame heat maps (else zeros)."""

    @property
    @abc.abstractmethod
    def threshold(self) -> float:
        """The calibrated decision threshold on the score."""

    def set_threshold(self, value: float) -> None:
        """Replace the decision threshold by hand; ``save`` persists it. Nothing else of the model changes.
        The calibration scores are dropped: they no longer stand behind the threshold, so a series of
        several frames is then compared with this threshold as it is (:meth:`series_threshold`)."""
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"threshold must be finite, got {value}")
        self._threshold = v
        self._calibration_scores = self._calibration_alpha = None

    def calibrate(self, scores: Sequence[float] | np.ndarray, alpha: float) -> float:
        """Set the threshold to the split-conformal quantile of ``scores`` (held-out normal images, each
        scored alone) at target false-positive rate ``alpha``, and keep the scores, so that
        :meth:`series_threshold` can give a series of T frames the same rate. Returns the threshold."""
        s, a = _checked_calibration(scores, alpha)
        self._threshold = conformal_threshold(s, a)
        self._calibration_scores, self._calibration_alpha = s, a
        return self._threshold

    @property
    def calibration_scores(self) -> np.ndarray | None:
        """The sorted calibration scores behind the threshold (a copy), or ``None``."""
        return None if self._calibration_scores is None else self._calibration_scores.copy()

    @property
    def calibration_alpha(self) -> float | None:
        """The target false-positive rate the threshold was calibrated at, or ``None`` when unknown."""
        return self._calibration_alpha

    def series_threshold(self, frames: int) -> float:
        """The threshold on the highest of ``frames`` frame scores (each frame scored alone, as the
        calibration images were): the conformal quantile of the calibration scores at ``calibration_alpha /
        frames``. By the union bound a series of normal frames, each exchangeable with the calibration
        normals, is then flagged with probability at most ``calibration_alpha``, however much its frames resemble
        each other (for near-identical frames it is conservative). With too few calibration scores for that
        rank it is the largest score, and :meth:`series_fpr_bound` says how far the guarantee weakens.
        Without calibration scores: the single-image threshold, which does not hold the rate for T > 1."""
        t = int(frames)
        if t < 1:
            raise ValueError(f"a series has at least one frame, got {frames}")
        if t == 1 or self._calibration_scores is None or self._calibration_alpha is None:
            return self.threshold
        return conformal_threshold(self._calibration_scores, self._calibration_alpha / t)

    def series_decision(self, frame_scores: Sequence[float] | np.ndarray, context_frames: int = 0
                        ) -> tuple[int, float, float]:
        """For a series whose frames were each scored alone: ``(k, score, threshold)``, ``k`` the index of
        the highest-scoring judged frame (the first of equals; the leading ``context_frames`` are not
        judged), ``score`` its score and ``threshold`` :meth:`series_threshold` of the judged frames."""
        scores = np.asarray(frame_scores, dtype=np.float64).ravel()
        c = int(context_frames)
        if not 0 <= c < scores.size:
            raise ValueError(f"context_frames {context_frames} leaves no judged frame among {scores.size}")
        k = c + int(np.argmax(scores[c:]))
        return k, float(scores[k]), self.series_threshold(scores.size - c)

    def series_fpr_bound(self, frames: int) -> float | None:
        """The bound on the false-positive rate of a series of ``frames`` normal frames compared with
        :meth:`series_threshold` (``frames`` times the per-frame bound, at most 1); ``None`` without
        calibration scores."""
        if self._calibration_scores is None or self._calibration_alpha is None:
            return None
        t = max(int(frames), 1)
        return min(1.0, t * conformal_exceedance_bound(self._calibration_scores.size, self._calibration_alpha / t))

    def series_extras(self, judged: int) -> dict[str, float]:
        """What a detection of a series of ``judged`` frames adds to its extras: the single-image threshold
        (``frame_threshold``) and, with calibration scores, :meth:`series_fpr_bound` (``series_fpr_bound``)."""
        extras = {"frame_threshold": self.threshold}
        bound = self.series_fpr_bound(judged)
        if bound is not None:
            extras["series_fpr_bound"] = float(bound)
        return extras

    def frame_detection(self, sequence: "FrameSequence", frame_scores: np.ndarray, heat_grid: np.ndarray | None,
                        heat_range: tuple[float, float] = (0.0, 1.0),
                        extras: dict[str, float] | None = None) -> "Detection":
        """The :class:`Detection` of a detector that scores each frame alone (knn-effnet, patch-gan): the
        highest judged frame against the threshold for their number (:meth:`series_decision`); the heat map
        each frame's grid of patch scores (``heat_grid``, ``(T, gh, gw)``) mapped to ``[0, 1]`` by
        ``heat_range`` and resized to the frame, zeros without a grid; ``extras`` and, for several frames,
        :meth:`series_extras`. Named by the card, or before one is written by the detector's own name and
        version."""
        import cv2

        _, score, thr = self.series_decision(frame_scores, sequence.context_frames)
        t, h, w = sequence.frames.shape
        extras = dict(extras or {})
        if heat_grid is not None:
            lo, hi = heat_range
            heat = np.clip((heat_grid - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
            heatmaps = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR) for f in heat])
            heatmaps = np.clip(heatmaps, 0.0, 1.0).astype(np.float32)
        else:
            heatmaps = np.zeros((t, h, w), dtype=np.float32)
        if t > 1:
            extras.update(self.series_extras(len(sequence.judged)))
        card = self.card
        return Detection(score=score, threshold=thr, is_anomaly=score > thr, heatmaps=heatmaps,
                         model_name=card.name if card else getattr(self, "name", self.registry_name),
                         model_version=card.version if card else getattr(self, "version", "0"),
                         cluster_label=None, frame_scores=tuple(float(s) for s in frame_scores), extras=extras)

    def save_calibration(self, model_dir: Path) -> list[str]:
        """Write :data:`CALIBRATION_FILENAME` (or remove a stale one when there are no scores); returns the
        names written. :func:`save_model` calls it after :meth:`save`."""
        path = Path(model_dir) / CALIBRATION_FILENAME
        if self._calibration_scores is None or self._calibration_alpha is None:
            path.unlink(missing_ok=True)
            return []
        doc = {
            "what": "scores of the held-out normal images (each scored alone) whose split-conformal quantile "
                    "is the threshold; a series of T frames is compared with their quantile at "
                    "target_fpr / T",
            "target_fpr": self._calibration_alpha,
            "threshold": self.threshold,
            "scores": [float(v) for v in self._calibration_scores],
        }
        path.write_text(json.dumps(doc, indent=1) + "\n")
        return [CALIBRATION_FILENAME]

    def load_calibration(self, model_dir: Path) -> None:
        """Read :data:`CALIBRATION_FILENAME` if the folder has one (:meth:`attach_calibration`: its scores
        must give the threshold the detector loaded; ``ValueError`` if not)."""
        path = Path(model_dir) / CALIBRATION_FILENAME
        if not path.is_file():
            self._calibration_scores = self._calibration_alpha = None
            return
        doc = json.loads(path.read_text())
        try:
            self.attach_calibration(doc["scores"], doc["target_fpr"])
        except ValueError as exc:
            raise ValueError(f"{path.name} in {model_dir}: {exc}") from None

    def attach_calibration(self, scores: Sequence[float] | np.ndarray, alpha: float) -> None:
        """Keep ``scores`` as the calibration scores behind the threshold the detector has, without moving
        it. Their conformal quantile at ``alpha`` must give that threshold (``ValueError`` if not): a
        threshold set by hand with stale scores beside it would otherwise be moved for every series."""
        s, a = _checked_calibration(scores, alpha)
        expected = conformal_threshold(s, a)
        # 1e-3: scores recomputed on another processor for a model shipped before they were kept differ in
        # the 4th digit (benchmarks/calibration_scores.py); a threshold moved by hand differs by far more
        if not math.isclose(expected, self.threshold, rel_tol=1e-3, abs_tol=1e-12):
            raise ValueError(f"its scores give the threshold {expected!r} at {a:g}, the model's threshold is "
                             f"{self.threshold!r}")
        self._calibration_scores, self._calibration_alpha = s, a

    @abc.abstractmethod
    def save(self, model_dir: Path) -> list[str]:
        """Write the model's files into ``model_dir``; return their names (the card is written by the caller)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, model_dir: Path, card: ModelCard) -> "Detector":
        """Rebuild a trained detector from a model folder."""


_REGISTRY: dict[str, type[Detector]] = {}
D = TypeVar("D", bound=type[Detector])


def highest_judged_frames(frame_scores: np.ndarray, owners: np.ndarray, sequences: Sequence[FrameSequence]
                          ) -> np.ndarray:
    """The highest frame score of each sequence among its judged frames (a prior study's leading context
    frames are not judged); ``owners[i]`` is the index of the sequence frame ``i`` belongs to."""
    out = np.full(len(sequences), -np.inf)
    judged = np.concatenate([np.arange(s.length) >= s.context_frames for s in sequences])
    np.maximum.at(out, owners[judged], frame_scores[judged])
    return out


def split_calibration_normals(name: str, normals: Sequence, validation: Sequence, fraction: float,
                              rng: np.random.Generator) -> tuple[list, list]:
    """``(fit normals, calibration normals)``: the given ``validation`` where there is one, else a share
    ``fraction`` of ``normals`` (at least one, and one left to fit) drawn by ``rng`` (which is used only
    then). The split of the detectors whose threshold is calibrated on held-out normals."""
    normals, validation = list(normals), list(validation)
    if not normals:
        raise ValueError(f"{name}: fit needs at least one normal sequence")
    if not validation:
        if len(normals) < 2:
            raise ValueError(f"{name}: need >= 2 normals to hold some out for calibration")
        order = rng.permutation(len(normals))
        n_val = min(len(normals) - 1, max(1, int(round(fraction * len(normals)))))
        validation = [normals[i] for i in order[:n_val]]
        normals = [normals[i] for i in order[n_val:]]
    return normals, validation


def register_detector(name: str):
    """Class decorator: make a detector available by ``name`` (the ``detector`` field of a model card)."""

    def deco(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, Detector)):
            raise TypeError(f"{cls!r} is not a Detector subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"detector name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.registry_name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_detectors() -> dict[str, type[Detector]]:
    """All registered detector classes, importing the detector modules first."""
    import inference.detectors  # noqa: F401  (each module registers itself on import)

    return dict(_REGISTRY)


def get_detector_class(name: str) -> type[Detector]:
    classes = registered_detectors()
    if name not in classes:
        raise KeyError(f"no detector registered as {name!r}; known: {sorted(classes)}")
    return classes[name]


def load_model(model_dir: Path, *, verify: bool = True) -> Detector:
    """Load a trained detector from a model folder (``card.json`` + the detector's files)."""
    model_dir = Path(model_dir)
    card = ModelCard.read(model_dir)
    cls = get_detector_class(card.detector)
    if verify:
        verify_model_files(model_dir, card, cls.MODEL_FILES)
    det = cls.load(model_dir, card)
    det.load_calibration(model_dir)
    det.card = card
    return det


def save_model(det: Detector, model_dir: Path) -> list[str]:
    """Write a detector's files (:meth:`Detector.save`) and its calibration scores into ``model_dir``;
    returns the names written (the card, with their checksums, is the caller's)."""
    return [*det.save(model_dir), *det.save_calibration(model_dir)]


def discover_model_dirs(paths: Iterable[Path]) -> list[Path]:
    """Model folders among ``paths``: each path is a model folder or a folder of model folders. Hidden
    folders are left out: ``medgru train`` and ``medgru calibrate`` write a model into one and rename it into
    place only when it is complete, so one that a killed run left behind is never served."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / CARD_FILENAME).is_file():
            found.append(p)
        elif p.is_dir():  # a hidden folder is a model being written or replaced (training.model_folder)
            found.extend(sorted(c for c in p.iterdir()
                                if not c.name.startswith(".") and (c / CARD_FILENAME).is_file()))
    return found


def hidden_models(cards: Iterable[tuple[Path, ModelCard]]
                  ) -> list[tuple[Path, ModelCard, list[tuple[Path, ModelCard]]]]:
    """The models :func:`select_model` never picks: every modality and body part of their scope is covered
    by models before them in ``cards``; each with those earlier models. A site-calibrated copy beside the
    model it came from (``models/chest-cxr`` and ``models/chest-cxr-site``, found in name order) is one."""
    earlier: list[tuple[Path, ModelCard]] = []
    hidden = []
    for path, card in cards:
        by: list[tuple[Path, ModelCard]] = []
        covered = bool(card.scope.modalities)
        for modality in card.scope.modalities:
            mod = modality.strip().upper()
            if card.scope.body_parts:
                parts = {b.strip().upper() for b in card.scope.body_parts}
                takers = [(p, c) for p, c in earlier if any(c.scope.covers(mod, b) for b in parts)]
                if not all(any(c.scope.covers(mod, b) for _, c in earlier) for b in parts):
                    covered = False
            else:  # any body part: hidden only behind a model of that modality and any body part
                takers = [(p, c) for p, c in earlier
                          if mod in {m.strip().upper() for m in c.scope.modalities} and not c.scope.body_parts]
                if not takers:
                    covered = False
            by.extend(t for t in takers if t not in by)
        if covered:
            hidden.append((path, card, by))
        earlier.append((path, card))
    return hidden


def select_model(cards: Iterable[tuple[Path, ModelCard]], modality: str, body_part: str
                 ) -> tuple[Path, ModelCard] | None:
    """The first model whose scope covers the sequence, or ``None`` (the sequence is not processed)."""
    for path, card in cards:
        if card.scope.covers(modality, body_part):
            return path, card
    return None
