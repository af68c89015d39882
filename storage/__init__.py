"""The label store: DuckDB schema, migrations, labels, imports, exports, snapshots. Imports neither app nor learner."""

from storage._common import is_number  # the store's rule for a finite number (bools excluded), for the app too

__all__ = ["is_number"]
