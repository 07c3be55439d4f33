"""Configuration of the graph-convolutional text tower (the text path of the dual-path GCN model)."""

from __future__ import annotations

from transformers import PreTrainedConfig

#: How the node features of the last GCN layer become the caption's summary (``pooler_output``).
GCN_POOLINGS = ("max", "mean")


class PCMETextGCNConfig(PreTrainedConfig):
    r"""Configuration of :class:`~hf_pcme.text_gcn.PCMETextGCNModel`.

    The tower holds one word graph over the whole vocabulary (k nearest neighbours by cosine
    similarity of word vectors, edges below ``similarity_threshold`` dropped) and runs two GCN
    layers (Kipf & Welling, ICLR 2017) over it for each caption; see the model's docstring.

    Args:
        vocab_size: number of words (token ids) of the tokenizer = number of graph nodes.
        word_dim: size of the word vectors (the node features).
        hidden_size: width of both GCN layers = the tower's output feature size.
        num_neighbors: k of the k-nearest-neighbour word graph (Yu et al. use k = 8).
        similarity_threshold: an edge needs a cosine similarity strictly above this value.
        pooling: ``"max"`` or ``"mean"`` over the caption's reached nodes for ``pooler_output``.
        pad_token_id: id of the padding token (never a node of any caption).
        word2vec_epochs: epochs of gensim Word2Vec when the vectors are trained on the training
            captions (used by ``hf_pcme.word_vectors``; not needed at inference).
        word2vec_window: context window of that Word2Vec.
        word2vec_min_count: words seen fewer times get no vector (and so no edges).
        initializer_range: kept for transformers compatibility (GCN weights use Xavier init).
    """

    model_type = "pcme_textgcn"

    vocab_size: int = 1000
    word_dim: int = 300
    hidden_size: int = 1024
    num_neighbors: int = 8
    similarity_threshold: float = 0.0
    pooling: str = "max"
    pad_token_id: int | None = 0
    word2vec_epochs: int = 20
    word2vec_window: int = 5
    word2vec_min_count: int = 1
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        for name in ("vocab_size", "word_dim", "hidden_size", "num_neighbors", "word2vec_epochs", "word2vec_window"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"text_config.{name} must be a positive integer, got {getattr(self, name)}.")
        if not -1.0 <= float(self.similarity_threshold) < 1.0:
            raise ValueError(
                f"text_config.similarity_threshold must be in [-1, 1) (a cosine similarity), got {self.similarity_threshold}."
            )
        if self.pooling not in GCN_POOLINGS:
            raise ValueError(f"text_config.pooling must be one of {GCN_POOLINGS}, got {self.pooling!r}.")
        super().__post_init__(**kwargs)


__all__ = ["PCMETextGCNConfig", "GCN_POOLINGS"]
