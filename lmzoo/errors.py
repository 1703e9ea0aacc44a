"""The one exception type users see. The CLI prints its message without a traceback."""


class LmzooError(Exception):
    """A user-facing error: the message names the file, tensor, field or argument, and the fix."""
