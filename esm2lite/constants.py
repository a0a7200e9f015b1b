"""Names every part of esm2lite agrees on, defined once."""

SPLITS = ("train", "valid", "test")
IGNORE_INDEX = -100  # target of a position without a label (<cls>, <eos>, <pad>, a residue masked 0)
