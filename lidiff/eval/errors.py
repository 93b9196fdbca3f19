"""The eval command's error type for user mistakes (bad paths, shapes, missing weights).

It is a ``lidiff.errors.UserError``: ``python -m lidiff.eval`` prints its message alone on stderr with exit
status 1, like every lidiff command.
"""

from lidiff.errors import UserError


class EvalInputError(UserError, ValueError):
    """A problem with what the user asked the evaluator to score; the message says what and how to fix it."""
