"""The task dashboard."""
