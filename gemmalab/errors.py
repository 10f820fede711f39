"""The one exception type the CLI turns into a clean message instead of a traceback."""


class GemmalabError(Exception):
    """A user-facing error: bad input, a missing file, a checkpoint that does not fit.

    The message is a complete sentence or paragraph naming the file, field or value at fault.
    """
