"""The package version, in a module of its own: modules that record it in their files import it from here,
not from the package root (whose lazy re-exports would close an import cycle through them)."""

__version__ = "0.1.0"
