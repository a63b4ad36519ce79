"""Keeping the history honest over time: retention (prune) and reconciliation against the broker."""
