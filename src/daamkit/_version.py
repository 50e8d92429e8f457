"""The package version, in a module of its own so that any floor can read it without importing the
package's public API (which imports the floors above)."""

__version__ = "0.1.0"
