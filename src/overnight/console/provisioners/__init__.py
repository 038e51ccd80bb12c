"""Providers the console's planner gets resources from (``base.py`` is the interface)."""
