"""The embedded broker's transport: kombu's ``filesystem://`` transport, made safe against a full disk.

kombu's transport creates a message's file under its final name and then writes the message into it. When
the write fails (the disk full, or the process killed in between), an empty or partial ``*.msg`` file stays
in the queue folder, and the worker that reads it next ends with "Unrecoverable error: JSONDecodeError"
(exit 1). On a full disk every failed enqueue left two (kombu tries twice), so once space came back the
embedded worker died once per such file, restarted by ``medgru serve`` after a back-off of up to a minute
each time.

Here a message is written under a temporary name that no reader picks, fsync'ed, and renamed onto its
final name, so a reader sees the whole message or none; a message file that still does not parse (left by
an older release, or by another writer) is logged and skipped instead of ending the worker.
"""

from __future__ import annotations

import logging
import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

log = logging.getLogger(__name__)

#: the prefix of a message being written: kombu's readers take only ``<stamp>_<uuid>.<queue>.msg``
WRITING_PREFIX = ".tmp-"


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        """Put ``payload`` onto ``queue``: whole, or not at all."""
        name = "{}_{}.{}.msg".format(int(round(monotonic() * 1000)), uuid.uuid4(), queue)
        final = os.path.join(self.data_folder_out, name)
        temp = os.path.join(self.data_folder_out, f"{WRITING_PREFIX}{name}.part")
        try:
            with open(temp, "wb") as fh:
                fh.write(str_to_bytes(dumps(payload)))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, final)
        except OSError as exc:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue):
        """The next message of ``queue``; a message file that does not parse is skipped (kombu has already
        taken it out of the queue folder), not raised: it would end the worker."""
        while True:
            try:
                return super()._get(queue)
            except ValueError as exc:  # json.JSONDecodeError: an empty or cut message file
                log.error("queue %s: a message file that does not parse was skipped (%s)", queue, exc)


class Transport(filesystem.Transport):
    Channel = Channel
