"""The one exception the predict function answers with."""


class Rejected(Exception):
    """Answer ``status`` with ``reason`` (4xx: permanent; 503: try again later)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason
