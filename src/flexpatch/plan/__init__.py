"""Memory planning: peak-memory models from probes; the largest patch, window and batch within a budget."""
