"""bundler: carry software releases across an air gap."""

__version__ = "0.1.0"
