"""The kdflow DAG, its compilation, the local runner and the `kdflow` CLI."""
