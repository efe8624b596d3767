"""Helpers for the project's tests: launching real multi-process (gloo) jobs."""
