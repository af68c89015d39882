"""The label store: DuckDB schema, migrations, labels, imports, exports, snapshots. Imports neither app nor learner."""
