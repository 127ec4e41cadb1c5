"""Errors caused by the user's input or environment, not by a bug.

The CLI prints their message as one line and exits with code 2; anything else keeps its traceback.
Each message names the problem and the fix."""


class UserError(Exception):
    """Base of every error whose message is meant for the user."""
