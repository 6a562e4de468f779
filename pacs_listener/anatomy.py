"""Resolve the imaged body part from ``BodyPartExamined`` or, failing that, from free-text descriptions.

Descriptions are written by technologists in many languages: matching is case- and accent-insensitive
on word stems (``cérébral`` → ``cerebral`` matches stem ``cerebr``). The result is a canonical
upper-case code (``BRAIN``, ``CHEST``, ``KNEE``...) or ``""`` when nothing is recognised.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

# canonical code -> (stems, whole words); accent-free, lower case. A stem matches at the start of a
# word ("cerebr" matches "cerebral", "cerebro", "cérébrale"); a whole word must match exactly.
_KEYWORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "BRAIN": (
        ("brain", "head", "cerebr", "crane", "crani", "craneo", "neuro", "skull", "schadel", "kopf",
         "gehirn", "hirn", "encephal", "encefal", "enkephal", "cabeza", "cervello", "cerveau",
         "hypophys", "pituitar"),
        ("iam", "sella", "testa", "mri_brain"),
    ),
    "CHEST": (
        ("chest", "thora", "torac", "torax", "lung", "poumon", "pulmo", "polmon", "pecho"),
        ("cxr", "rib", "ribs"),
    ),
    "KNEE": (("knee", "genou", "knie", "rodilla", "ginocchio", "joelho", "patell", "menisc"), ()),
    "ABDOMEN": (("abdo", "bauch", "ventre", "liver", "foie", "leber", "higado"), ()),
    "SPINE": (("spine", "spinal", "rachis", "wirbel", "columna", "lumbar", "lombaire"), ()),
    "PELVIS": (("pelvi", "bassin", "becken", "hanche"), ("hip", "hips")),
}

# exact DICOM BodyPartExamined defined terms (PS3.16 CID 4031 style) that map to our codes
_BODY_PART_TERMS: dict[str, str] = {
    "HEAD": "BRAIN", "BRAIN": "BRAIN", "SKULL": "BRAIN", "CEREBRUM": "BRAIN", "HEADNECK": "BRAIN",
    "CHEST": "CHEST", "THORAX": "CHEST", "LUNG": "CHEST", "CHEST_ABDOMEN": "CHEST",
    "KNEE": "KNEE", "ABDOMEN": "ABDOMEN", "LIVER": "ABDOMEN",
    "SPINE": "SPINE", "CSPINE": "SPINE", "TSPINE": "SPINE", "LSPINE": "SPINE",
    "PELVIS": "PELVIS", "HIP": "PELVIS",
}

_WORD_RE = re.compile(r"[a-z0-9]+")


def _fold(text: str) -> str:
    """Lower case, accents stripped (NFKD), ``ß`` → ``ss``."""
    decomposed = unicodedata.normalize("NFKD", text.replace("ß", "ss"))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(_fold(text))


def resolve_from_text(text: str) -> str:
    """Canonical body part named in ``text`` (first recognised word in reading order), or ``""``."""
    for word in _words(text):
        for code, (stems, whole) in _KEYWORDS.items():
            if word in whole or word.startswith(stems):
                return code
    return ""


def resolve_body_part(body_part_examined: str | None, descriptions: Iterable[str | None] = ()) -> str:
    """The imaged body part.

    ``BodyPartExamined`` wins when present: a known term (``HEAD``, ``THORAX``...) is mapped to its code,
    any other value is kept upper-cased. Otherwise the descriptions (series first, then study, protocol)
    are searched for multilingual keywords. ``""`` when nothing is known.
    """
    raw = (body_part_examined or "").strip()
    if raw:
        key = re.sub(r"[\s\-]+", "", _fold(raw).upper())
        if key in _BODY_PART_TERMS:
            return _BODY_PART_TERMS[key]
        from_text = resolve_from_text(raw)
        return from_text or raw.upper()[:64]
    for text in descriptions:
        if text:
            code = resolve_from_text(str(text))
            if code:
                return code
    return ""
