"""Word vectors for the text GCN tower: Word2Vec trained on the training captions, or a vector file.

Both use gensim (Řehůřek & Sojka, 2010). Word2Vec (Mikolov et al., 2013) is trained with one worker
thread and a fixed seed, so the vectors (and the word graph built from them) are reproducible.
A vector file is read with ``KeyedVectors.load_word2vec_format``: the word2vec text format (a
``count dim`` header line, then ``word v1 ... vD``), or the same without the header (GloVe).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _gensim_models():
    try:
        import gensim.models
    except ImportError as error:  # pragma: no cover - gensim is in the test extra
        raise ImportError(
            "The text GCN's word vectors need gensim: pip install 'hf_pcme[textgcn]' (or pip install gensim)."
        ) from error
    return gensim.models


def caption_words(tokenizer: Any, captions: Iterable[str]) -> list[list[str]]:
    """Each caption as the list of its vocabulary words (the tokenizer's own lower-casing and splitting)."""
    special = set(getattr(tokenizer, "all_special_tokens", []))
    return [[word for word in tokenizer.tokenize(caption) if word not in special] for caption in captions]


def _vocabulary_matrix(lookup: Any, vocab: dict[str, int], word_dim: int) -> tuple[torch.Tensor, int]:
    vectors = np.zeros((max(vocab.values()) + 1, word_dim), dtype=np.float32)
    found = 0
    for word, index in vocab.items():
        if word in lookup:
            vectors[index] = lookup[word]
            found += 1
    return torch.from_numpy(vectors), found


def train_word2vec(
    sentences: list[list[str]],
    vocab: dict[str, int],
    word_dim: int,
    window: int = 5,
    epochs: int = 20,
    min_count: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """``(len(vocab), word_dim)`` Word2Vec vectors of the vocabulary words, trained on ``sentences``.

    Vocabulary words seen fewer than ``min_count`` times get a zero row (no vector).
    """
    Word2Vec = _gensim_models().Word2Vec  # noqa: N806

    if not any(sentences):
        raise ValueError("Cannot train Word2Vec for the text GCN: the training captions contain no words.")
    model = Word2Vec(
        sentences=sentences,
        vector_size=word_dim,
        window=window,
        min_count=min_count,
        workers=1,  # one thread: the result is the same on every run
        seed=seed,
        epochs=epochs,
    )
    vectors, found = _vocabulary_matrix(model.wv, vocab, word_dim)
    logger.info("Word2Vec on %d captions: vectors for %d of %d vocabulary words.", len(sentences), found, len(vocab))
    return vectors


def load_word_vector_file(path: str | os.PathLike, vocab: dict[str, int], word_dim: int) -> torch.Tensor:
    """``(len(vocab), word_dim)`` vectors of the vocabulary words from a word2vec-format text file (header optional).

    Words missing from the file get a zero row; a file that covers none of them raises a ``ValueError``.
    """
    KeyedVectors = _gensim_models().KeyedVectors  # noqa: N806

    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"model.word_embeddings: word-vector file {path!r} not found.")
    try:
        keyed = KeyedVectors.load_word2vec_format(path, binary=False)
    except (ValueError, IndexError):  # no "count dim" header line (GloVe layout)
        keyed = KeyedVectors.load_word2vec_format(path, binary=False, no_header=True)
    if keyed.vector_size != word_dim:
        raise ValueError(
            f"model.word_embeddings: {path} holds {keyed.vector_size}-d vectors but text_config.word_dim is "
            f"{word_dim}; set text_config.word_dim to {keyed.vector_size}."
        )
    vectors, found = _vocabulary_matrix(keyed, vocab, word_dim)
    if found == 0:
        raise ValueError(
            f"model.word_embeddings: {path} has no vector for any of the {len(vocab)} vocabulary words "
            "(they are the tokenizer's lower-cased words); use a matching vector file, or leave "
            "model.word_embeddings unset to train Word2Vec on the training captions."
        )
    logger.info("Loaded vectors for %d of %d vocabulary words from %s.", found, len(vocab), path)
    return vectors


def initialise_text_gcn(
    text_model: Any,
    tokenizer: Any,
    captions: Iterable[str] | None = None,
    vector_file: str | os.PathLike | None = None,
    seed: int = 0,
) -> int:
    """Give a :class:`~hf_pcme.PCMETextGCNModel` its word vectors and word graph; returns the words covered.

    From ``vector_file`` when given, else from Word2Vec trained on ``captions`` with the tower's
    ``word2vec_*`` settings.
    """
    config = text_model.config
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) + 1 != config.vocab_size:
        raise ValueError(
            f"The tokenizer has {max(vocab.values()) + 1} ids but text_config.vocab_size is {config.vocab_size}."
        )
    if vector_file is not None:
        vectors = load_word_vector_file(vector_file, vocab, config.word_dim)
    else:
        if captions is None:
            raise ValueError(
                "The text GCN needs word vectors: set model.word_embeddings to a word2vec-format file, or train "
                "from captions (the training captions are used when the recipe builds the tokenizer)."
            )
        vectors = train_word2vec(
            caption_words(tokenizer, captions), vocab, config.word_dim, window=config.word2vec_window,
            epochs=config.word2vec_epochs, min_count=config.word2vec_min_count, seed=seed,
        )
    return text_model.set_word_vectors(vectors)


__all__ = ["caption_words", "initialise_text_gcn", "load_word_vector_file", "train_word2vec"]
