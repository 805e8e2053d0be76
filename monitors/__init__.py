"""canvaswatch.monitors: the monitor contract, the registry, and the built-in monitors.

The contract (what a monitor is, sees and returns, and the rules it keeps) is
canvaswatch.monitors.base; canvaswatch.monitors.testing checks a monitor against it.
"""

from canvaswatch.monitors.base import (
    DecodedStep,
    Evidence,
    FinalCanvas,
    Flag,
    Monitor,
    MonitorProtocol,
    NoParams,
    RequestMeta,
    Severity,
    Vocabulary,
)

__all__ = [
    "DecodedStep", "Evidence", "FinalCanvas", "Flag", "Monitor", "MonitorProtocol", "NoParams", "RequestMeta",
    "Severity", "Vocabulary",
]
