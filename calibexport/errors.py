"""The one exception type that calibexport raises for bad user input or a failed check."""


class CalibexportError(Exception):
    """A user-facing error: the message states what failed, the value seen and what to do.

    The CLI prints the message to stderr without a traceback and exits with code 2.
    """
