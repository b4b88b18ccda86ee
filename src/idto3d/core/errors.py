"""User-facing errors.

Anything a user can cause (bad config, unreadable mesh, bad resolution) raises
``IdtoError`` with a message that says what is wrong and how to fix it; the CLI
prints the message without a traceback and exits with status 2.
"""


class IdtoError(Exception):
    """An error caused by the user's input, with a message meant for them."""


class ConfigError(IdtoError):
    """A configuration value or file is invalid."""


class MeshError(IdtoError):
    """A mesh file is missing, unreadable, empty or not a closed manifold."""
