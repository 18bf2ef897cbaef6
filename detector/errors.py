"""Small named exceptions shared by the worker and the trainer."""


class AnomalyScorerError(Exception):
    """Base class of every error this project raises on purpose."""


class ArtifactError(AnomalyScorerError):
    """An artifact directory is missing, incomplete, tampered with or of an unknown schema."""


class MissingExtra(AnomalyScorerError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""


class ThresholdPolicyError(AnomalyScorerError, ValueError):
    """A threshold policy string cannot be parsed or cannot be met by the held-out data."""


class InvalidMessage(AnomalyScorerError):
    """An input stream entry that cannot be scored; `code` is a short metric label."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
