"""The embedded broker's transport on a full disk (worker/filesystem_broker.py)."""

from __future__ import annotations

import contextlib
import resource
import signal

import pytest

from worker.celery_app import DEFAULT_QUEUE, make_celery
from worker.tasks import BrokerUnavailable, enqueue_job


@contextlib.contextmanager
def no_room_for_file_bytes():
    """Every write of file bytes by this process fails (EFBIG), as writes do on a full disk; files can still
    be created, as on a full disk that has inodes left."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def queue_files(settings) -> list:
    return sorted(p for p in (settings.broker_dir / "queue").iterdir())


def test_an_enqueue_refused_by_a_full_disk_leaves_no_message_file(make_settings):
    """kombu created the message file under its final name and then wrote into it: on a full disk the write
    failed and an empty ``*.msg`` stayed in the queue (two per enqueue: kombu tries twice; seen on a full
    tmpfs), and the embedded worker that read it ended with "Unrecoverable error: JSONDecodeError"."""
    settings = make_settings()
    app = make_celery(settings)
    enqueue_job(app, 1)  # the queue declared (its exchange file written) while there is room
    before = queue_files(settings)
    with no_room_for_file_bytes():
        with pytest.raises(BrokerUnavailable):
            enqueue_job(app, 2)
    assert queue_files(settings) == before
    enqueue_job(app, 3)  # room again: enqueued as before
    assert len(queue_files(settings)) == len(before) + 1


def test_a_message_file_that_does_not_parse_is_skipped_not_raised(make_settings):
    """An empty message file (left by a write cut short: a full disk under an older release, a kill between
    the file's creation and its write) ended the embedded worker at each such file, which ``medgru serve``
    restarted after a back-off of up to a minute; the messages behind it are delivered now."""
    settings = make_settings()
    app = make_celery(settings)
    enqueue_job(app, 7)
    [message] = queue_files(settings)
    stamp = int(message.name.split("_", 1)[0])
    (message.parent / f"{stamp - 1}_00000000-cut-short.{DEFAULT_QUEUE}.msg").write_bytes(b"")  # read first
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(DEFAULT_QUEUE)
        try:
            received = queue.get_nowait()
            received.ack()
        finally:
            queue.close()
    assert received.headers["task"] == "medgru.run_job"
    assert received.decode()[1] == {"job_id": 7}
    assert queue_files(settings) == []
