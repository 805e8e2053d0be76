"""The transport-free data path: engine, per-request session, one stream's message sequence, and
the sinks a session's flags and verdict go to."""
