"""pydicom's reading warnings without patient data, and with the instance they are about.

pydicom reports a value it finds invalid in its own log *and* as a ``UserWarning``, often quoting the value:
``Invalid value for VR DA: '19xx0101'`` is a patient's birth date when the element is (0010,0030). Our
logs name UIDs, never such values. :func:`install` (idempotent; called by ``configure_logging``, the
listener and the worker) therefore

* adds a filter to the ``pydicom`` logger that replaces every quoted value in its messages by ``'…'`` and,
  while a thread is inside :func:`instance_context`, prefixes the message with that SOP Instance UID;
* ignores pydicom's ``UserWarning`` copies of those messages (they would reach stderr with the values);
* writes the control characters of every log message as ``\\xNN`` (:func:`medgru.tables.printable`): a body
  part of ``ESC[2J`` or a terminal hyperlink from a modality reached the service's and the worker's logs as
  it was, and acted on the terminal of the admin reading them (``tail -f``). Newlines and tabs are kept in
  the message's own text (its format string) but escaped in its arguments, the values from outside: a
  refusal reason or a PACS's error comment with a newline could write a line of its own into the log that
  looked like the service's (``... refused: x\\n2026-12-08 INFO job 7 succeeded``).
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_state = threading.local()
_lock = threading.Lock()


def redact(message: str, keep_up_to: int = 0) -> str:
    """``message`` with every quoted value replaced by ``'…'``; values of at most ``keep_up_to`` characters
    (a two-letter VR in a parser's error, say) are kept."""
    return _QUOTED.sub(lambda m: m[0] if len(m[0]) - 2 <= keep_up_to else "'…'", message)


class PydicomRecordFilter(logging.Filter):
    """Redacts quoted values and names the instance being read (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = redact(record.getMessage())
        uid = getattr(_state, "uid", None)
        record.msg = f"SOP Instance {uid}: {message}" if uid else message
        record.args = ()
        return True


def _format_exception(exc_info, printable) -> str:
    """The traceback of ``exc_info`` as logging writes it, each exception's message (of the chain too) with
    its control characters escaped, newlines included: a message from outside must not write a line of its
    own into the log."""
    te = traceback.TracebackException(*exc_info)
    seen: set[int] = set()
    todo = [te]
    while todo:
        t = todo.pop()
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(getattr(t, "_str", None), str):  # the message, as format_exception_only writes it
            t._str = printable(t._str)
        notes = getattr(t, "__notes__", None)  # add_note() texts, printed after the message
        if isinstance(notes, (list, tuple)):
            t.__notes__ = [printable(note) for note in notes]
        todo += [t.__cause__, t.__context__, *(getattr(t, "exceptions", None) or ())]
    return "".join(te.format()).rstrip("\n")


def _escaped_value(value, printable):
    """``value``, or its text with every control character escaped (newlines too) where it has one."""
    if isinstance(value, (int, float)):  # keeps %d / %.3f working; no control characters in their text
        return value
    try:
        text = str(value)
    except Exception:  # noqa: BLE001 - an argument whose str() raises: left for the handler to report
        return value
    safe = printable(text)
    return value if safe == text else safe


def _escaping_record_factory(base):
    """A log record factory that writes the control characters of each message as ``\\xNN`` (newlines too,
    where they come from an argument or a message that is not a format string)."""
    from medgru.tables import printable

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = base(*args, **kwargs)
        if not isinstance(record.msg, str):  # log.error(exc): the whole message is a value from outside
            record.msg = _escaped_value(record.msg, printable)
        if isinstance(record.args, tuple):
            record.args = tuple(_escaped_value(a, printable) for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: _escaped_value(v, printable) for k, v in record.args.items()}
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a format that does not match its arguments (a missing %(key)s,
            # an argument whose str() raises): the handler reports it later; a log call must never raise
            return record
        safe = printable(message, lines=True)
        if safe != message:
            record.msg, record.args = safe, ()
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            # the traceback's last line is the exception's message: a value from outside as well, whose
            # newlines are escaped too (the traceback's own stay)
            try:
                text = _format_exception(record.exc_info, printable)
            except Exception:  # noqa: BLE001 - left to the formatter
                return record
            record.exc_text = printable(text, lines=True)
        return record

    factory.escapes_controls = True  # type: ignore[attr-defined]
    return factory


def install() -> None:
    """Filter pydicom's log records, silence its duplicate warnings and escape control characters in every
    log message, once per process."""
    with _lock:
        current = logging.getLogRecordFactory()
        if not getattr(current, "escapes_controls", False):
            logging.setLogRecordFactory(_escaping_record_factory(current))
        logger = logging.getLogger("pydicom")
        if not any(isinstance(f, PydicomRecordFilter) for f in logger.filters):
            logger.addFilter(PydicomRecordFilter())
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


@contextmanager
def instance_context(sop_instance_uid: str) -> Iterator[None]:
    """pydicom records of this thread name ``sop_instance_uid`` until the block ends."""
    previous = getattr(_state, "uid", None)
    _state.uid = str(sop_instance_uid)
    try:
        yield
    finally:
        _state.uid = previous
