"""Predictions, embeddings and zero-shot variant scores."""
