"""The reading side: a stored study's trials as arms, statistics, fits, tables, figures, the
report, the dashboard and exported configs (no torch)."""
