"""Reward models behind one interface. This package never imports `rlalign`, so a server ships alone."""

__version__ = "0.1.0"
