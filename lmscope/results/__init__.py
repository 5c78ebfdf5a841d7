"""Results: the one long results schema (Parquet) and DuckDB queries over it."""
