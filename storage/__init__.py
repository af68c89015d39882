"""The label store: DuckDB schema, migrations, labels, imports, exports, snapshots. Imports neither app nor learner."""

# The store's rule for a finite number (bools excluded), a dict as the store writes it, and a directory that cannot be
# written as a new one (what `new_directory` refuses), for the app too.
from storage._common import directory_taken, is_number, to_json

__all__ = ["directory_taken", "is_number", "to_json"]
