"""Sequences and labels from CSV / FASTA into records, and records into batches."""
