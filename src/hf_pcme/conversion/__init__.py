"""Converters of checkpoints from other codebases into hf_pcme models."""
