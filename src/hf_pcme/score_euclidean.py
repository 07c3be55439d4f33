"""Negative squared Euclidean distance of the means: FAISS ``IndexFlatL2``'s ranking, exact as an inner product.

Ignores the variances, so on a probabilistic model it is the "means only" ablation of PCME++'s
CSD (which adds ``sum sigma_v^2 + sum sigma_t^2``).
"""

from __future__ import annotations

from typing import Any

import torch

from .score_common import Score, as_embedding_rows, mean_and_log_sigma2


class EuclideanScore(Score):
    r"""``-|mu_v - mu_t|^2``; for K embeddings per item, the best of the K x K' pairs.

    An inner product with one extra dimension, since ``-|x - y|^2 = 2 x . y - |x|^2 - |y|^2``::

        item(t)  = [2 mu_t, -|mu_t|^2]      query(v) = [mu_v, 1],  offset |mu_v|^2
        query(v) . item(t) - offset(v) = -|mu_v - mu_t|^2
    """

    name = "euclidean"
    searchable = True
    extra_dims = 1

    def pairwise(self, image_embeds: Any, text_embeds: Any) -> torch.Tensor:
        image = as_embedding_rows(mean_and_log_sigma2(image_embeds)[0], "image_embeds")
        text = as_embedding_rows(mean_and_log_sigma2(text_embeds)[0], "text_embeds")
        (n, k, dim), (m, k_text, _) = image.shape, text.shape
        distances = torch.cdist(image.reshape(n * k, dim), text.reshape(m * k_text, dim)).pow(2)
        return -distances.view(n, k, m, k_text).amin(dim=(1, 3))

    def _item_block(self, mean: torch.Tensor, log_sigma2: torch.Tensor | None) -> torch.Tensor:
        mean = mean.float()
        return torch.cat([2.0 * mean, -mean.pow(2).sum(-1, keepdim=True)], dim=-1)

    def query_vectors(
        self, mean: torch.Tensor, log_sigma2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean = as_embedding_rows(mean, "query_mean")
        return torch.cat([mean, torch.ones_like(mean[..., :1])], dim=-1), mean.pow(2).sum(-1)

    def means_from_item_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors[..., :-1] * 0.5  # exact: halving undoes the doubling in floating point
