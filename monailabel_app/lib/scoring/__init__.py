from .mc_dropout import MCDropoutScoring  # noqa: F401
