"""The label store: DuckDB schema, migrations, labels, imports, exports and snapshots. Imports neither app nor learner."""
