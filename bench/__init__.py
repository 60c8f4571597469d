"""pgproxy's benchmark: direct PostgreSQL, PgBouncer and pgproxy, side by side, in one run."""
