"""The Textual app (being written)."""
