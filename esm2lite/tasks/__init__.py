"""What is predicted: label spaces, metrics and the evaluation of a split."""
