"""Developer tools: tiny random checkpoints for tests and demos."""
