"""The one exception type a user can cause.

Anything the user can get wrong (a bad path, an unknown layer, a foreign HDF5 file, an invalid
init spec) raises ``UserError`` with a one-line message. The CLI turns it into that line on stderr
and exit code 2; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; its message is shown as one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
