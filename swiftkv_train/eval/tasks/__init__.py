"""Local lm-evaluation-harness tasks (no Hub): `TaskManager(include_path=<this folder>)` finds the YAML files."""
