class ProviderError(Exception):
    """The payment processor refused or could not be reached; safe to show (no secrets inside)."""
