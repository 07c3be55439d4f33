"""The small built-in text tower of PCME: word embeddings + bi-directional GRU.

Outputs follow the transformers convention so the projection heads treat it like any other
text backbone: ``last_hidden_state`` (B, L, H) are the per-token GRU outputs (local features),
``pooler_output`` (B, H) concatenates the forward direction's state at the last real token and
the backward direction's state at the first token (the sentence summary).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_text_encoders import PCMEBiGRUConfig


@torch.no_grad()
def init_word_and_gru_weights(module: nn.Module, initializer_range: float) -> None:
    """Word embeddings ~ N(0, initializer_range) with a zero padding row; GRU weights Xavier-uniform, biases 0."""
    if isinstance(module, nn.Embedding):
        init.normal_(module.weight, mean=0.0, std=initializer_range)
        if module.padding_idx is not None:
            init.zeros_(module.weight[module.padding_idx])
    elif isinstance(module, nn.GRU):
        for name, param in module.named_parameters():
            (init.xavier_uniform_ if "weight" in name else init.zeros_)(param)


class PCMEBiGRUModel(PreTrainedModel):
    config_class = PCMEBiGRUConfig
    config: PCMEBiGRUConfig
    base_model_prefix = "bigru"
    main_input_name = "input_ids"

    def __init__(self, config: PCMEBiGRUConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.word_dim, padding_idx=config.pad_token_id)
        self.gru = nn.GRU(
            config.word_dim,
            config.hidden_size // 2,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
            bidirectional=True,
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_word_and_gru_weights(module, self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(dim=1).clamp_min(1)
        embedded = self.word_embeddings(input_ids)
        packed = nn.utils.rnn.pack_padded_sequence(
            embedded, lengths.to("cpu", torch.int64), batch_first=True, enforce_sorted=False
        )
        packed_out, _ = self.gru(packed)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(packed_out, batch_first=True, total_length=input_ids.shape[1])
        half = self.config.hidden_size // 2
        last_index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, half)
        forward_last = hidden[:, :, :half].gather(1, last_index).squeeze(1)
        backward_first = hidden[:, 0, half:]
        pooled = torch.cat([forward_last, backward_first], dim=-1)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)

    @torch.no_grad()
    def load_word_vectors(self, path: str | os.PathLike, vocab: dict[str, int]) -> int:
        """Initialise word embeddings from a GloVe-format text file (``word v1 v2 ... vD`` per line).

        Words of ``vocab`` (token -> id, e.g. ``tokenizer.get_vocab()``) found in the file get their
        vector; the others keep their random initialisation. Returns the number of words found.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Word-vector file {path} not found; expected a GloVe-format text file (e.g. glove.840B.300d.txt)."
            )
        found = 0
        weight = self.word_embeddings.weight
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                word, _, rest = line.rstrip("\n").partition(" ")
                token_id = vocab.get(word)
                if token_id is None or token_id == self.config.pad_token_id:
                    continue
                values = rest.split(" ")
                if len(values) != self.config.word_dim:
                    raise ValueError(
                        f"{path}:{line_number}: word {word!r} has {len(values)} values but word_dim is "
                        f"{self.config.word_dim}; set text_config.word_dim to the file's vector size."
                    )
                weight[token_id] = torch.tensor([float(v) for v in values], dtype=weight.dtype, device=weight.device)
                found += 1
        return found


__all__ = ["PCMEBiGRUModel"]
