"""Word-level tokenizer for the built-in bi-GRU text tower.

The original PCME tokenises captions into lower-cased words with a vocabulary built from the
training captions. We build the same thing with the ``tokenizers`` library and wrap it in a
``PreTrainedTokenizerFast`` so it saves, loads and pads like any transformers tokenizer
(``AutoTokenizer.from_pretrained`` needs no custom code for it).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"


def build_word_level_tokenizer(
    texts: Iterable[str], min_frequency: int = 1, model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """Build a lower-casing, punctuation-splitting word-level tokenizer from ``texts``.

    Token 0 is ``[PAD]`` and token 1 is ``[UNK]``; words seen fewer than ``min_frequency`` times
    map to ``[UNK]``.
    """
    backend = Tokenizer(WordLevel(unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    trainer = WordLevelTrainer(special_tokens=[PAD_TOKEN, UNK_TOKEN], min_frequency=min_frequency)
    backend.train_from_iterator(texts, trainer=trainer)
    if backend.get_vocab_size() <= 2:
        raise ValueError("Cannot build a tokenizer: the texts given contain no words.")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
    )
