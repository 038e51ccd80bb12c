"""One router per resource, collected in ``api/app.py``."""
