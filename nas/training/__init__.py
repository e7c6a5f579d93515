"""The training side: corpora and their shards, the Lightning module, one run, its checkpoints,
compilation and loggers (no Optuna)."""
