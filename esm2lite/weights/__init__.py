"""Pretrained weights in and out: HF / fair-esm / BioNeMo layouts read into ESM-2, HF and peft directories written."""
