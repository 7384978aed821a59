"""Errors of the backend registry."""


class BackendUnavailable(RuntimeError):
    """A requested backend is not built or not usable here; the message says how to get it."""
