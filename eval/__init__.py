"""Evaluation: the lm-evaluation-harness backend over our checkpoints, the local task pack, the results table."""
