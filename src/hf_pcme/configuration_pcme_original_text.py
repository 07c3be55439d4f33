"""Configuration of the text tower of the original PCME code, for converted checkpoints."""

from __future__ import annotations

from transformers import PreTrainedConfig


class PCMEOriginalTextConfig(PreTrainedConfig):
    r"""Configuration of :class:`PCMEOriginalTextModel`: the original PCME caption encoder's towers.

    The original (naver-ai/pcme ``EncoderText``) feeds the word embeddings to two bi-GRUs (the
    sentence GRU and the uncertainty module's own GRU) and pools the word embeddings themselves
    with attention. This tower exposes exactly those features: the word embeddings as the local
    features (``local_feature_size = word_dim``) and both GRUs' outputs at the last real token,
    concatenated, as the global feature (``global_feature_size = 2 * gru_hidden_size``).

    Args:
        vocab_size: number of words of the vocabulary (``word2idx``).
        word_dim: size of the word embeddings (300, GloVe, in PCME).
        gru_hidden_size: output size of each bi-GRU (both directions): the embedding size D.
        pad_token_id: id of ``<pad>`` (0 in PCME).
        initializer_range: std of the normal initialisation of the word embeddings.
    """

    model_type = "pcme_original_text"

    vocab_size: int = 1000
    word_dim: int = 300
    gru_hidden_size: int = 1024
    pad_token_id: int | None = 0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.gru_hidden_size % 2:
            raise ValueError(f"gru_hidden_size must be even (two GRU directions), got {self.gru_hidden_size}.")
        super().__post_init__(**kwargs)

    @property
    def local_feature_size(self) -> int:
        return int(self.word_dim)

    @property
    def global_feature_size(self) -> int:
        return 2 * int(self.gru_hidden_size)


__all__ = ["PCMEOriginalTextConfig"]
