"""The label store: DuckDB schema, migrations, labels, imports, exports, snapshots. Imports neither app nor learner."""

# The store's rule for a finite number (bools excluded), and a dict as the store writes it, for the app too.
from storage._common import is_number, to_json

__all__ = ["is_number", "to_json"]
