"""Exceptions that stackwise raises for problems a user can fix."""

from __future__ import annotations

__all__ = ["StackwiseError", "SpecError", "DataError", "StageFailed", "ArtifactError", "UsageError"]


class StackwiseError(Exception):
    """Raised for any problem that stackwise reports to the user without a traceback.

    `exit_code` is the process exit status the command line uses for it.
    """

    exit_code = 1


class SpecError(StackwiseError):
    """Raised when a stack spec is malformed, inconsistent or refers to something missing."""

    exit_code = 2


class DataError(StackwiseError):
    """Raised when the data source cannot be read or its content cannot be trained on."""

    exit_code = 2


class StageFailed(StackwiseError):
    """Raised when a stage's training, feature extraction or export fails."""

    exit_code = 1


class ArtifactError(StackwiseError):
    """Raised when an artifact in the store is incomplete or fails its checksums."""

    exit_code = 1


class UsageError(StackwiseError):
    """Raised when a command-line argument names something that does not exist, such as the store."""

    exit_code = 2
