"""Where a session's flags and verdict go besides the caller: one sink per module.

metrics.py counts flags (canvaswatch_flags), audit.py writes the audit log's JSON lines,
report.py writes the HTML report of a flagged request, log.py emits the structlog events.
Each implements base.Sink; the engine builds the list from the config (Engine.__init__), and
every session of that engine calls each sink in list order. Adding a destination (an event
exporter, say) is one module here and one entry in that list.
"""
