"""gRPC transport: the CanvasMonitor servicer, the worker relay, auth, and wire <-> value conversion."""
