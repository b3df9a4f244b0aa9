"""stimnetd: the StimNet node daemon."""

__version__ = "0.1.0"
