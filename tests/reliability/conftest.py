"""The reliability tests share tests/conftest.py's `trained_run` fixture."""
