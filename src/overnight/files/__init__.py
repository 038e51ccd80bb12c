"""Files: upload, list, retrieve, delete and content, scoped by tenant."""
