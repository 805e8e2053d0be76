"""canvaswatch.server: the gRPC sidecar (transport, decoding, sessions, metrics, CLI)."""
