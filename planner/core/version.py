"""distplan's version: written into every plan's provenance and every emitted file's header."""

__version__ = "0.1.0"
