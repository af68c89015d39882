"""Benchmarks that print figures (nothing here is asserted in tests). Run from the repository root as modules,
`.venv/bin/python -m bench.sampling`, so that `bench/learner.py` cannot shadow the `learner` package."""
