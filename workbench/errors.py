"""Errors that mean the user asked for something that cannot be done; shown as one line."""


class UserError(Exception):
    """A problem with what the user asked for; printed as one line."""
