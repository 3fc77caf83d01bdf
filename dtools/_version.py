"""The version, in a module of its own: ``from ._version import __version__`` works even
when a directory named ``dtools`` in the current directory shadows the package's
``__init__`` (``python -m dtools.sample`` run from the parent of a site home called dtools)."""

__version__ = "0.1.0"
