"""The PostgreSQL wire protocol 3.0, pure: bytes in, messages out. No I/O here."""
