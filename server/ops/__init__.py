"""What operators read: Prometheus metrics (also merged across processes), the audit log, structured logs, the HTML report, the health probe."""
