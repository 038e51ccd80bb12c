"""The console: jobs ("this dataset through this model"), the planner that carries
them out, and the models and templates they name, kept as document records in the
store (``store.records.DocRecord``)."""
