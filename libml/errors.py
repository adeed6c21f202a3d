"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
  """A problem with the user's input, reported as one line naming the fix.

  `main.py` prints the message without a traceback and exits with status 2.
  The message must be a single line: what is wrong, and what to do about it.
  """
