"""Benchmarks of Telehealth Bridge. Speed is measured here, never asserted in tests; see
docs/benchmarks.md."""
