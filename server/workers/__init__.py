"""Monitor worker processes: decoding and monitors on more than one core behind one gRPC front."""
