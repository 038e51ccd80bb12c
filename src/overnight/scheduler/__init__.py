"""Which batch runs next, where, and by which replica."""
