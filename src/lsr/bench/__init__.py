"""The benchmark: what is measured (grid), how (measure), the sweep (runner), its data (results) and charts (plot)."""
