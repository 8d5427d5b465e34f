"""modula: train, tune and serve MoDULA models on Ray. The package's layers and where each
command lives: docs/architecture.md."""
