"""Compatibility only: FineTuned became task_model.TaskModel (it computes) and ckpt_dir (its
files: ckpt_dir.load_model, ckpt_dir.load_weights). This module goes once nothing imports it
(tests/test_layouts.py still does)."""

from .ckpt_dir import load_model


class FineTuned:
    load = staticmethod(load_model)
