"""The package version, in a module of its own: the app reads it without running
``tollway/__init__.py`` (``tollway`` -> ``tollway.app`` -> ... -> ``tollway`` would be a circle).
"""

__version__ = "0.1.0"
