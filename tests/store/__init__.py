"""Store tests: a package so the shared helpers import relatively (no sys.path edits)."""
