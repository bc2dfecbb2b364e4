from .uncertainty import MostUncertain  # noqa: F401
