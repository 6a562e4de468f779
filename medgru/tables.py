"""Helpers shared by the admin commands (``medgru jobs``, ``medgru outbox``, ``medgru quarantine``).

They print ids, states, UIDs, calling AE titles and our own reasons; never patient names.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Any, Sequence


#: the largest row id looked up: the tables' keys are INTEGER, 32 bits on PostgreSQL (64 on SQLite); a
#: larger id made the driver raise (out of range, or an OverflowError on SQLite) instead of "no such row"
MAX_ROW_ID = 2**31 - 1


def row_id(text: str) -> int:
    """An ``argparse`` type for a row id on the command line: 1 to :data:`MAX_ROW_ID`."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an id") from None
    if not 1 <= value <= MAX_ROW_ID:
        raise argparse.ArgumentTypeError(f"{text} is not an id (1 to {MAX_ROW_ID})")
    return value


def positive_int(text: str) -> int:
    """An ``argparse`` type for a count such as ``--limit``: 1 or more (``--limit 0`` listed one row)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return value


def open_database(settings):
    """A session factory on the service's database; an empty one gets the schema (quietly). One at an older
    schema revision is refused (:class:`storage.db.SchemaOlderThanRelease`), not migrated: an admin command
    run between installing a release and restarting the service migrated the database under the older
    service, which then ran on a schema it does not know (its listener's instances named no patient)."""
    # the table is the output, not migration chatter; set before alembic is imported, whose plugin
    # registry logs at INFO on import
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("storage.db").setLevel(logging.WARNING)
    from storage.db import init_db, make_session_factory

    settings.ensure_dirs()
    return make_session_factory(init_db(settings.effective_database_url, upgrade_existing=False))


#: what a terminal acts on instead of showing: C0 controls (ESC starts a colour, a screen clear, a window
#: title or a hyperlink; BEL, backspace, carriage return overwrite), DEL, C1 controls (0x9B is a one-byte
#: CSI) and the invisible format characters that reorder or hide text (bidi overrides, zero-width)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
_CONTROL_KEEP_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")


def printable(value: Any, *, lines: bool = False) -> str:
    """``value`` as text safe to print on an admin's terminal: every control character (see
    :data:`_CONTROL`) written as ``\\xNN`` / ``\\uNNNN``. The values come from outside (a modality's body
    part or modality, a PACS's error comment, a refusal reason): ``ESC[2J`` in BodyPartExamined cleared the
    screen of ``medgru jobs list``, ``ESC]8;;URL`` made a link. ``lines``: keep newlines and tabs (a
    multi-line error in ``show``)."""
    text = "" if value is None else str(value)
    pattern = _CONTROL_KEEP_LINES if lines else _CONTROL
    return pattern.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: columns padded to their widest cell; control characters escaped (:func:`printable`)."""
    cells = [[printable(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def when(dt: datetime | None) -> str:
    """``YYYY-MM-DD HH:MM:SS`` (UTC, as stored), or empty."""
    return dt.strftime("%Y-%m-%d %H:%M:%S") if dt is not None else ""


def when_iso(iso: str | None, *, minutes: bool = False) -> str:
    """An ISO 8601 time as the tables show it (``YYYY-MM-DD HH:MM:SS``, or without the seconds), or empty."""
    return (iso or "")[:16 if minutes else 19].replace("T", " ")


def print_fields(fields: Sequence[tuple[str, Any]]) -> None:
    """``key  value`` lines, keys padded to the longest; control characters escaped (:func:`printable`)."""
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {printable(value, lines=True)}")
