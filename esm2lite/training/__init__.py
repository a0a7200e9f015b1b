"""Fine-tuning: the run's config (the CLI), the loop, optimiser, modes (what trains), plots."""
