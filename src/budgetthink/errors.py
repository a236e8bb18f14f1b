"""The one exception type for bad user input.

The CLI prints `error: <message>` on one line and exits with code 2; `--debug` shows the traceback.
Raise it wherever a user (config, data file, flag, request) is at fault, with a message that names the
problem and how to fix it.
"""


class UserError(Exception):
    """Bad input from the user: a one-line message naming the problem and the fix."""
