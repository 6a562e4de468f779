"""Deterministic UIDs for the objects we create.

A result object's UIDs are derived from what it is *about* (the source Series Instance UID), *who* made
it (model name and version) and *what kind* of object it is (``"sr-series"``, ``"sr-instance"``,
``"sc-series"``, ``"sc-instance"``, ...). A SOP Instance UID also carries :func:`input_key`, a digest of
the frames the result was computed from. Re-running the same model on the same frames therefore yields the
same SOP Instance UIDs, and the PACS holds one copy, not a duplicate. A result computed from other frames
(a late slice completed the series, a prior study was added) is a new instance: one UID for two different
contents would leave the PACS with whichever it kept (Orthanc keeps the first by default) while our
outbox said the new one was stored. A new model version yields new UIDs, so its results sit beside the
old ones; the result series (its Series Instance UID) stays one per source series and model version.

The UIDs live under the ``2.25`` root (ISO/IEC 9834-8, PS3.5 B.2): ``2.25.`` followed by the decimal form
of a 128-bit integer, here the first 128 bits of a SHA-256 digest of the parts. That is at most
``5 + 39 = 44`` characters, well within the 64-character limit, with no leading zeros.
"""

from __future__ import annotations

import hashlib
import re

UID_ROOT = "2.25."
_NAMESPACE = b"medgru-worker/result-uid/v1"
_SEPARATOR = b"\x1f"  # ASCII unit separator: ("a", "bc") and ("ab", "c") hash differently
UID_MAX_LENGTH = 64
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# object kinds, for callers that prefer names to string literals
SR_SERIES = "sr-series"
SR_INSTANCE = "sr-instance"
SC_SERIES = "sc-series"
SC_INSTANCE = "sc-instance"
DEVICE_OBSERVER = "device-observer"
KOS_SERIES = "kos-series"  # the IOCM rejection note of results a revision replaced (reporting.kos)
KOS_INSTANCE = "kos-instance"


def derive_uid(*parts: str) -> str:
    """A valid ``2.25.<int>`` UID determined by ``parts`` (non-empty strings).

    >>> derive_uid("1.2.3", "medgru-svc", "1.0.0", "sr-instance") == derive_uid("1.2.3", "medgru-svc", "1.0.0", "sr-instance")
    True
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    encoded: list[bytes] = []
    for i, part in enumerate(parts):
        if not isinstance(part, str):
            raise TypeError(f"derive_uid part {i} must be a str, not {type(part).__name__}")
        if not part:
            raise ValueError(f"derive_uid part {i} is empty")
        encoded.append(part.encode("utf-8"))
    digest = hashlib.sha256(_NAMESPACE + _SEPARATOR + _SEPARATOR.join(encoded)).digest()
    value = int.from_bytes(digest[:16], "big") or 1  # 0 would be valid too, but never mind
    uid = f"{UID_ROOT}{value}"
    assert is_valid_uid(uid), uid
    return uid


def is_valid_uid(uid: str) -> bool:
    """True if ``uid`` is a syntactically valid DICOM UID (PS3.5 9.1)."""
    return isinstance(uid, str) and 0 < len(uid) <= UID_MAX_LENGTH and bool(_UID_RE.match(uid))


def result_uid(source_series_uid: str, model_name: str, model_version: str, kind: str) -> str:
    """The UID of one result object (``kind``) for a source series scored by a model version."""
    return derive_uid(source_series_uid, model_name, model_version, kind)


def input_key(frame_refs) -> str:
    """A digest of the frames a result was computed from, in order: ``(SOP Instance UID, frame number)``
    pairs, context frames included. A part of each result's SOP Instance UID (see the module docstring)."""
    refs = [(str(uid), int(number)) for uid, number in frame_refs]
    if not refs:
        raise ValueError("input_key needs the frames the result was computed from")
    return hashlib.sha256(_SEPARATOR.join(f"{uid}:{n}".encode() for uid, n in refs)).hexdigest()[:32]
