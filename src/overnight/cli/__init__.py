"""The ``overnight`` command line."""
