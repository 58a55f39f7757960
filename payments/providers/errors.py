class ProviderError(Exception):
    """The payment processor refused or could not be reached; safe to show (no secrets inside)."""


class MalformedEvent(ValueError):
    """A correctly signed delivery whose body we can never process: not JSON, nested too deep, or a
    field missing or of the wrong type. A retry of the same bytes cannot succeed, so it is answered
    400 and stored as ``rejected`` for staff — never 500, which would have the provider retry it.

    ``event_id`` / ``event_type`` are set when the envelope could be read but its object could not,
    so the stored row carries the provider's own id."""

    def __init__(self, message: str, *, event_id: str = "", event_type: str = ""):
        super().__init__(message)
        self.event_id, self.event_type = event_id, event_type
