"""Adapters for the payment processors: outgoing API calls and payload parsing, no database."""
