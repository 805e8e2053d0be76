"""The transport-free data path: engine, per-request session, one stream's message sequence."""
