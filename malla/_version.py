"""The single source of malla's version (read by setup.py through pyproject)."""

__version__ = "0.1.0"
