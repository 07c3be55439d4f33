"""hf_pcme."""
