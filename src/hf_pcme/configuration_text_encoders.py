"""Configuration of the small built-in text tower (bi-GRU over word embeddings, as in PCME)."""

from __future__ import annotations

from transformers import PreTrainedConfig


class PCMEBiGRUConfig(PreTrainedConfig):
    r"""Configuration of :class:`PCMEBiGRUModel`, the bi-directional GRU text tower of PCME.

    Args:
        vocab_size: number of words (token ids) of the tokenizer.
        word_dim: size of the word embeddings (300 for GloVe).
        hidden_size: size of the tower's output features; each GRU direction has
            ``hidden_size // 2`` units and the two directions are concatenated.
        num_layers: stacked GRU layers.
        dropout: dropout between stacked GRU layers.
        pad_token_id: id of the padding token (its embedding stays zero).
        initializer_range: std of the normal initialisation of the word embeddings.
    """

    model_type = "pcme_bigru"

    vocab_size: int = 1000
    word_dim: int = 300
    hidden_size: int = 1024
    num_layers: int = 1
    dropout: float = 0.0
    pad_token_id: int | None = 0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.hidden_size % 2:
            raise ValueError(f"hidden_size must be even (two GRU directions of hidden_size // 2), got {self.hidden_size}.")
        super().__post_init__(**kwargs)


__all__ = ["PCMEBiGRUConfig"]
