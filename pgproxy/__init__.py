"""pgproxy: an identity-aware PostgreSQL wire-protocol proxy."""

__version__ = "0.1.0"
