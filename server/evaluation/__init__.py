"""Offline scoring: how well each monitor separates labelled traces."""
