"""The package version, in a module of its own: the app's modules import it from here,
not from ``tollway``, whose ``__init__`` leads to the app (``tollway`` -> ``tollway.app``
-> ... -> ``tollway`` would be an import circle).
"""

__version__ = "0.1.0"
