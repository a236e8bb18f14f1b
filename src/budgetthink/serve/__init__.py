"""The OpenAI-compatible server (see app.py)."""

from budgetthink.serve.app import create_app, run

__all__ = ["create_app", "run"]
