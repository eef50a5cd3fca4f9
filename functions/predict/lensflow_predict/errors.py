"""The one exception the predict function answers with."""


class Rejected(Exception):
    """Answer ``status`` with ``reason`` (4xx: permanent; 503: try again later).

    ``waiting`` (with 503): the replica cannot take any event yet, for a reason that is
    not the event's (``no_model``); said in the reply's JSON so that a caller that knows
    (lensflow's dispatcher) holds events instead of spending their retries.
    """

    def __init__(self, status: int, reason: str, waiting: str | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.waiting = waiting
