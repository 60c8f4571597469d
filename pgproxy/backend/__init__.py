"""Connections to PostgreSQL and the pools that hold them."""
