"""canvaswatch.monitors: the monitor contract, the registry, and the built-in monitors."""

from canvaswatch.monitors.base import (
    DecodedStep,
    Evidence,
    FinalCanvas,
    Flag,
    Monitor,
    RequestMeta,
    Severity,
    Vocabulary,
)

__all__ = ["DecodedStep", "Evidence", "FinalCanvas", "Flag", "Monitor", "RequestMeta", "Severity", "Vocabulary"]
