"""The one exception type lcpc raises for bad input.

Every user-facing failure (bad file, unsupported op, impossible K, tampered output
folder) ends in an :class:`LcpcError` whose message names what was wrong, where, and
what to do instead. The CLI prints that single line and exits non-zero; any other
exception type escaping lcpc is a bug. ``Interrupted`` is the ``LcpcError`` of a run the
user stopped.
"""


class LcpcError(Exception):
    """A problem with the user's input that lcpc explains in one line."""


class Interrupted(LcpcError):
    """The user stopped a long run (Ctrl-C, SIGTERM); the message says what was kept and how to
    continue. The CLI exits with 130, as a shell does for Ctrl-C."""
