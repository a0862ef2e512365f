"""Prefect flows of stackwise and its command line."""
