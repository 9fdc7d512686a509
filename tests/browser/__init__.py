"""Helpers for tests that drive a real headless Chromium against real local servers."""
