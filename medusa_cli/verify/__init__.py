"""Judging compiled heads: the float64 numpy oracle, the per-scheme thresholds, and the reports
`medusa verify` returns."""
