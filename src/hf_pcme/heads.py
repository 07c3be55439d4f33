"""Projection heads: local + global tower features -> embeddings in the joint space.

All heads share PIE-Net's mean branch (Song & Soleymani, "Polysemous Visual-Semantic
Embedding for Cross-Modal Retrieval", CVPR 2019), used by PCME (Chun et al., CVPR 2021):

    A      = softmax over positions of  w2 . tanh(w1 x)        (K heads, padding masked)
    pooled = A^T x                                               (attention pooling of local features x)
    out_k  = LayerNorm(g + dropout(sigmoid(fc(pooled_k))))       (g = projected global feature)
    mean_k = out_k / ||out_k||

The probabilistic head adds PCME's uncertainty branch, which has the same shape but no
normalisation or sigmoid: ``log_sigma2 = fc(attention-pooled x) + fc(g_raw)``, unbounded, read
as the log variance of each dimension (the original code calls it ``logsigma``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .outputs import ProbabilisticEmbedding


class AttentionPooling(nn.Module):
    """Additive multi-head attention pooling over a set of local features.

    ``A = softmax_L(w2 tanh(w1 x))`` of shape (B, K, L) and ``pooled = A x`` of shape (B, K, C).
    """

    def __init__(self, in_dim: int, hidden_dim: int, num_heads: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, num_heads, bias=False)

    def forward(self, local: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.w2(torch.tanh(self.w1(local))).transpose(1, 2).float()  # (B, K, L)
        if mask is not None:
            scores = scores.masked_fill(~mask.bool().unsqueeze(1), float("-inf"))
        attention = scores.softmax(dim=-1).to(local.dtype)
        return attention, attention @ local


class PIEMeanBranch(nn.Module):
    """PIE-Net mean branch with K attention heads; returns means (B, K, D) and attention (B, K, L)."""

    def __init__(self, local_dim: int, global_dim: int, embed_dim: int, hidden_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.global_proj = nn.Linear(global_dim, embed_dim)
        self.attention = AttentionPooling(local_dim, hidden_dim, num_heads)
        self.local_proj = nn.Linear(local_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(
        self, local: torch.Tensor, global_feature: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attention, pooled = self.attention(local, mask)
        residual = self.dropout(torch.sigmoid(self.local_proj(pooled)))
        out = self.layer_norm(self.global_proj(global_feature).unsqueeze(1) + residual)
        return F.normalize(out, dim=-1), attention


class UncertaintyBranch(nn.Module):
    """PCME's log-variance branch: ``log_sigma2 = fc(attention-pooled local) + fc(global) + bias``.

    The two projections share one explicit ``bias`` (the original has one per projection; only
    their sum matters). It is the initial log variance: ``PCMEConfig.init_log_sigma2``.
    """

    def __init__(self, local_dim: int, global_dim: int, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.attention = AttentionPooling(local_dim, hidden_dim, 1)
        self.local_proj = nn.Linear(local_dim, embed_dim, bias=False)
        self.global_proj = nn.Linear(global_dim, embed_dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(embed_dim))

    def forward(self, local: torch.Tensor, global_feature: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        _, pooled = self.attention(local, mask)
        return self.local_proj(pooled.squeeze(1)) + self.global_proj(global_feature) + self.bias


class _PIEHead(nn.Module):
    """Shared constructor: every head has a PIE mean branch; only polysemous heads use K > 1."""

    #: Whether ``num_embeds`` (K) sets the number of attention heads of the mean branch.
    uses_num_embeds = False

    def __init__(
        self,
        local_dim: int,
        global_dim: int,
        embed_dim: int,
        hidden_dim: int,
        dropout: float = 0.0,
        num_embeds: int = 1,
    ):
        super().__init__()
        num_heads = num_embeds if self.uses_num_embeds else 1
        self.mean_branch = PIEMeanBranch(local_dim, global_dim, embed_dim, hidden_dim, num_heads, dropout)


class DeterministicHead(_PIEHead):
    """One point embedding per item (VSE++ / InfoNCE); ``log_sigma2`` is ``None``."""

    def forward(self, local: torch.Tensor, global_feature: torch.Tensor, mask: torch.Tensor | None = None) -> ProbabilisticEmbedding:
        mean, attention = self.mean_branch(local, global_feature, mask)
        return ProbabilisticEmbedding(mean=mean.squeeze(1), attention=attention)


class ProbabilisticHead(_PIEHead):
    """PCME head: a Gaussian ``N(mean, diag(exp(log_sigma2)))`` per item."""

    def __init__(self, local_dim: int, global_dim: int, embed_dim: int, hidden_dim: int, **kwargs: Any):
        super().__init__(local_dim, global_dim, embed_dim, hidden_dim, **kwargs)
        self.uncertainty_branch = UncertaintyBranch(local_dim, global_dim, embed_dim, hidden_dim)

    def forward(self, local: torch.Tensor, global_feature: torch.Tensor, mask: torch.Tensor | None = None) -> ProbabilisticEmbedding:
        mean, attention = self.mean_branch(local, global_feature, mask)
        log_sigma2 = self.uncertainty_branch(local, global_feature, mask)
        return ProbabilisticEmbedding(mean=mean.squeeze(1), log_sigma2=log_sigma2, attention=attention)


class PolysemousHead(_PIEHead):
    """PVSE head: K point embeddings per item, ``mean`` of shape (B, K, D), one attention map per embedding."""

    uses_num_embeds = True

    def forward(self, local: torch.Tensor, global_feature: torch.Tensor, mask: torch.Tensor | None = None) -> ProbabilisticEmbedding:
        mean, attention = self.mean_branch(local, global_feature, mask)
        return ProbabilisticEmbedding(mean=mean, attention=attention)


class DiversifiedAttentionHead(nn.Module):
    """GPLDAN's diversified attention projector: K representations per item that see each other.

    K additive attention maps pool the local features (as PIE-Net / PVSE), then the K pooled
    vectors interact through one residual self-attention step before each is projected like PIE's
    mean branch::

        A, P  = attention pooling (K heads) of local features x       A (B, K, L), P (B, K, C)
        P'    = P + softmax(P Wq (P Wk)^T / sqrt(C)) P Wv                (representations attend to each other)
        r_k   = normalize(LayerNorm(g + dropout(sigmoid(fc(P'_k)))))    g = projected global feature

    ``mean`` is ``(B, K, D)`` and ``attention`` is ``A``; a diversity term on ``A`` (``||Â Â^T - I||_F^2``)
    belongs to the loss (``loss_type="graph_pattern"``, as ``"pvse"``). Scoring is the best (or mean) of
    the K x K pairs, as for the polysemous head.

    Reference: Chen, Zhang & Zhan, "Graph Pattern Loss based Diversified Attention Network for
    Cross-Modal Retrieval", ICIP 2020 (arXiv:2106.13552). The paper's projector is described as
    "considering the interaction between different representations"; the single self-attention step
    above is our reading of that interaction.
    """

    uses_num_embeds = True

    def __init__(
        self,
        local_dim: int,
        global_dim: int,
        embed_dim: int,
        hidden_dim: int,
        dropout: float = 0.0,
        num_embeds: int = 1,
    ):
        super().__init__()
        if int(num_embeds) < 1:
            raise ValueError(f"num_embeds (K) must be a positive integer for the diversified attention head, got {num_embeds}.")
        self.attention = AttentionPooling(local_dim, hidden_dim, num_embeds)
        self.query = nn.Linear(local_dim, local_dim, bias=False)
        self.key = nn.Linear(local_dim, local_dim, bias=False)
        self.value = nn.Linear(local_dim, local_dim)
        self.global_proj = nn.Linear(global_dim, embed_dim)
        self.local_proj = nn.Linear(local_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, local: torch.Tensor, global_feature: torch.Tensor, mask: torch.Tensor | None = None) -> ProbabilisticEmbedding:
        attention, pooled = self.attention(local, mask)
        scores = self.query(pooled) @ self.key(pooled).transpose(1, 2) / pooled.shape[-1] ** 0.5
        pooled = pooled + scores.float().softmax(dim=-1).to(pooled.dtype) @ self.value(pooled)
        residual = self.dropout(torch.sigmoid(self.local_proj(pooled)))
        out = self.layer_norm(self.global_proj(global_feature).unsqueeze(1) + residual)
        return ProbabilisticEmbedding(mean=F.normalize(out, dim=-1), attention=attention)


#: head_type -> head class. A new head is a new class plus one entry here.
HEADS: dict[str, type[nn.Module]] = {
    "probabilistic": ProbabilisticHead,
    "deterministic": DeterministicHead,
    "polysemous": PolysemousHead,
    "diversified_attention": DiversifiedAttentionHead,
}

#: Heads that give K embeddings per item ``(B, K, D)``, scored by the best of the K x K pairs.
MULTI_EMBEDDING_HEADS = ("polysemous", "diversified_attention")
