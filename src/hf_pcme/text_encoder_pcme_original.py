"""The caption tower of the original PCME code (naver-ai/pcme), for converted checkpoints.

Original forward (Chun et al., CVPR 2021; the PVSE caption encoder it builds on): word embeddings
``w`` (B, L, word_dim); the sentence bi-GRU's output at the last real token (both directions at
position ``length - 1``, as the original gathers them from the padded output) is the global
feature of the mean head; the PIE attention pools ``w`` itself; the uncertainty module runs its
own bi-GRU over ``w`` and adds its output at the last real token to ``fc(attention-pooled w)``.

Here ``last_hidden_state`` = ``w`` (the local features) and ``pooler_output`` = ``[sentence GRU
last, uncertainty GRU last]`` (B, 2 D). A :class:`~hf_pcme.heads.ProbabilisticHead` on top reads
the first half as the mean's global feature (an identity block in its ``global_proj``) and the
second half for ``log_sigma2`` (``2 * I`` there: the original's ``logsigma`` is a log standard
deviation, see :mod:`hf_pcme.conversion.pcme_original`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_pcme_original_text import PCMEOriginalTextConfig
from .text_encoders import init_word_and_gru_weights


def _output_at_last_token(gru: nn.GRU, embedded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Both directions' outputs at position ``length - 1`` of each sequence: (B, hidden)."""
    packed = nn.utils.rnn.pack_padded_sequence(embedded, lengths.to("cpu", torch.int64), batch_first=True,
                                               enforce_sorted=False)  # fmt: skip
    hidden, _ = nn.utils.rnn.pad_packed_sequence(gru(packed)[0], batch_first=True, total_length=embedded.shape[1])
    index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1)


class PCMEOriginalTextModel(PreTrainedModel):
    config_class = PCMEOriginalTextConfig
    config: PCMEOriginalTextConfig
    base_model_prefix = "pcme_original_text"
    main_input_name = "input_ids"

    def __init__(self, config: PCMEOriginalTextConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.word_dim, padding_idx=config.pad_token_id)
        half = config.gru_hidden_size // 2
        self.gru = nn.GRU(config.word_dim, half, batch_first=True, bidirectional=True)
        self.uncertainty_gru = nn.GRU(config.word_dim, half, batch_first=True, bidirectional=True)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_word_and_gru_weights(module, self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(dim=1).clamp_min(1)
        embedded = self.word_embeddings(input_ids)
        pooled = torch.cat(
            [_output_at_last_token(self.gru, embedded, lengths), _output_at_last_token(self.uncertainty_gru, embedded, lengths)],
            dim=-1,
        )
        return BaseModelOutputWithPooling(last_hidden_state=embedded, pooler_output=pooled)


__all__ = ["PCMEOriginalTextModel"]
