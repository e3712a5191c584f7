"""The exception types a user can cause.

Anything the user can get wrong (a bad path, an unknown layer, a foreign HDF5 file, an invalid
init spec, a damaged checkpoint, an output another process is writing) raises ``UserError`` with a
one-line message. The CLI turns it into that line on stderr and the error's ``exit_code`` (2);
every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input or files; its message is shown as one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class RunDiverged(UserError):
    """Training stopped because too many steps in a row had a non-finite loss or gradient (exit 3)."""

    exit_code = 3
