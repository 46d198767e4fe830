"""The one exception type lcpc raises for bad input.

Every user-facing failure (bad file, unsupported op, impossible K, tampered output
folder) ends in an :class:`LcpcError` whose message names what was wrong, where, and
what to do instead. The CLI prints that single line and exits non-zero; any other
exception type escaping lcpc is a bug.
"""


class LcpcError(Exception):
    """A problem with the user's input that lcpc explains in one line."""
