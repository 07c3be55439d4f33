"""Graph-convolutional text tower: the text path of the dual-path GCN model.

Reference: Yu et al., "Modeling Text with Graph Convolutional Network for Cross-Modal Information
Retrieval", PCM 2018 (arXiv:1802.00985), and "Semantic Modeling of Textual Relationships in
Cross-Modal Retrieval", KSEM 2019. GCN layers: Kipf & Welling, "Semi-Supervised Classification with
Graph Convolutional Networks", ICLR 2017.

The word graph (one for the whole vocabulary, built once from word vectors)::

    S_ij   = cos(e_i, e_j)                                   word vectors e (Word2Vec or a vector file)
    kNN(i) = the num_neighbors words j != i with the largest S_ij and S_ij > similarity_threshold
    A_ij   = S_ij if j in kNN(i) or i in kNN(j), else 0      (symmetric, no self-loops)
    Â      = D^-1/2 (A + I) D^-1/2,  D_ii = sum_j (A + I)_ij

Words without a vector (padding, ``[UNK]``, words the vectors do not cover) have a zero vector
and no edges. A caption is a bag of its words on this graph: node ``v`` carries
``count(v in caption) * e_v`` (zero for every other node). Two GCN layers,

    H1 = ReLU(Â X W1),   H2 = ReLU(Â H1 W2),

spread each word's features to its neighbours (and theirs). ``pooler_output`` pools H2 over the
nodes the caption reaches (max by default); ``last_hidden_state`` is H2 read at the caption's
tokens (the local features the projection heads attend over).

Departures from Yu et al.: their node signal is a scalar word frequency and their GCN uses
Chebyshev filters (Defferrard et al.) with graph coarsening; here the node signal is the word
vector scaled by its count, the layers are Kipf & Welling's first-order ones, and the pooling is
a global max (or mean) over reached nodes. The word graph and the vectors are buffers, saved with
the model, so ``from_pretrained`` needs nothing else. Memory per forward is
``batch x vocab_size x hidden_size`` floats (every node of the graph is computed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_textgcn import PCMETextGCNConfig


def knn_word_graph(
    word_vectors: torch.Tensor, num_neighbors: int, similarity_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-nearest-neighbour lists of each word: ``(neighbor_ids, neighbor_weights)``, both ``(V, k)``.

    ``neighbor_weights[i, m]`` is the cosine similarity of word ``i`` to its m-th neighbour, or 0 where
    fewer than k words pass ``similarity_threshold`` (that slot is then no edge). Rows of zero
    vectors have no neighbours and are nobody's neighbour.
    """
    if word_vectors.dim() != 2:
        raise ValueError(f"word_vectors must be (vocab_size, word_dim), got shape {tuple(word_vectors.shape)}.")
    vectors = word_vectors.detach().float()
    num_words = vectors.shape[0]
    has_vector = vectors.norm(dim=1) > 0
    unit = F.normalize(vectors, dim=1)
    similarity = unit @ unit.t()
    invalid = ~(has_vector.unsqueeze(0) & has_vector.unsqueeze(1))
    invalid |= torch.eye(num_words, dtype=torch.bool, device=vectors.device)
    similarity = similarity.masked_fill(invalid, -torch.inf)
    k = min(num_neighbors, max(num_words - 1, 1))
    values, ids = similarity.topk(k, dim=1)
    keep = values > similarity_threshold  # -inf (no vector / self) never passes
    weights = torch.where(keep, values, torch.zeros_like(values))
    ids = torch.where(keep, ids, torch.zeros_like(ids))
    if k < num_neighbors:  # tiny vocabularies: pad to the configured k with empty slots
        pad = num_neighbors - k
        weights = F.pad(weights, (0, pad))
        ids = F.pad(ids, (0, pad))
    return ids, weights


def adjacency_from_neighbors(neighbor_ids: torch.Tensor, neighbor_weights: torch.Tensor) -> torch.Tensor:
    """The symmetric weighted adjacency ``A`` (sparse COO, ``(V, V)``) of k-NN lists: an edge if either word lists the other.

    The similarity is symmetric, so both directions carry the same weight; ``A`` has no self-loops.
    """
    num_words = neighbor_ids.shape[0]
    rows = torch.arange(num_words, device=neighbor_ids.device).unsqueeze(1).expand_as(neighbor_ids)
    keep = neighbor_weights != 0
    rows, cols, weights = rows[keep], neighbor_ids[keep], neighbor_weights[keep].float()
    indices = torch.cat([torch.stack([rows, cols]), torch.stack([cols, rows])], dim=1)
    values = torch.cat([weights, weights])
    summed = torch.sparse_coo_tensor(indices, values, (num_words, num_words), check_invariants=False).coalesce()
    counts = torch.sparse_coo_tensor(indices, torch.ones_like(values), (num_words, num_words), check_invariants=False).coalesce()
    # a mutual pair appears twice: the sum over the count is its similarity again
    return torch.sparse_coo_tensor(summed.indices(), summed.values() / counts.values(), (num_words, num_words), check_invariants=False).coalesce()


def normalized_adjacency(adjacency: torch.Tensor) -> torch.Tensor:
    """Kipf & Welling's ``Â = D^-1/2 (A + I) D^-1/2`` (sparse in, sparse out; ``D`` = row sums of ``A + I``)."""
    num_words = adjacency.shape[0]
    adjacency = adjacency.coalesce()
    eye = torch.arange(num_words, device=adjacency.device)
    indices = torch.cat([adjacency.indices(), torch.stack([eye, eye])], dim=1)
    values = torch.cat([adjacency.values().float(), torch.ones(num_words, device=adjacency.device)])
    with_loops = torch.sparse_coo_tensor(indices, values, (num_words, num_words), check_invariants=False).coalesce()
    degree = torch.zeros(num_words, device=adjacency.device).index_add_(0, with_loops.indices()[0], with_loops.values())
    scale = degree.rsqrt()
    rows, cols = with_loops.indices()
    return torch.sparse_coo_tensor(
        with_loops.indices(), with_loops.values() * scale[rows] * scale[cols], (num_words, num_words),
        check_invariants=False,
    ).coalesce()


class GraphConvolution(nn.Module):
    """One GCN layer, ``H' = ReLU(Â H W)`` (Kipf & Welling, ICLR 2017; no bias, so unreached nodes stay 0).

    ``Â`` is a sparse ``(V, V)`` matrix shared by the batch; ``H`` is ``(B, V, in_dim)``.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, adjacency: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.propagate(adjacency, hidden @ self.weight)

    @staticmethod
    def propagate(adjacency: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """``ReLU(Â P)`` for already projected node features ``P = H W`` of shape ``(B, V, C)``."""
        batch, num_nodes, channels = projected.shape
        flat = projected.float().permute(1, 0, 2).reshape(num_nodes, batch * channels)
        with torch.autocast(device_type=projected.device.type, enabled=False):
            mixed = torch.sparse.mm(adjacency.float(), flat)
        return torch.relu(mixed.reshape(num_nodes, batch, channels).permute(1, 0, 2)).to(projected.dtype)


class PCMETextGCNModel(PreTrainedModel):
    """Two GCN layers over a k-NN word graph; see the module docstring for the formulas.

    The graph and the word vectors are buffers: set them with :meth:`set_word_vectors` (the
    training builders do, from Word2Vec trained on the training captions or from a vector file).
    """

    config_class = PCMETextGCNConfig
    config: PCMETextGCNConfig
    base_model_prefix = "textgcn"
    main_input_name = "input_ids"

    def __init__(self, config: PCMETextGCNConfig):
        super().__init__(config)
        vocab, k = config.vocab_size, config.num_neighbors
        self.register_buffer("word_vectors", torch.zeros(vocab, config.word_dim))
        self.register_buffer("neighbor_ids", torch.zeros(vocab, k, dtype=torch.long))
        self.register_buffer("neighbor_weights", torch.zeros(vocab, k))
        self.layer1 = GraphConvolution(config.word_dim, config.hidden_size)
        self.layer2 = GraphConvolution(config.hidden_size, config.hidden_size)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, GraphConvolution):
            init.xavier_uniform_(module.weight)

    def get_input_embeddings(self) -> None:
        """The word vectors are fixed buffers, not a trainable embedding table."""
        return None

    @torch.no_grad()
    def set_word_vectors(self, word_vectors: torch.Tensor) -> int:
        """Store ``(vocab_size, word_dim)`` word vectors and build the word graph from them.

        Rows of zeros mean "no vector" (no edges). Returns the number of words with a vector.
        """
        expected = (self.config.vocab_size, self.config.word_dim)
        if tuple(word_vectors.shape) != expected:
            raise ValueError(
                f"word_vectors must have shape (text_config.vocab_size, text_config.word_dim) = {expected}, "
                f"got {tuple(word_vectors.shape)}."
            )
        covered = int((word_vectors.float().norm(dim=1) > 0).sum())
        if covered == 0:
            raise ValueError(
                "None of the vocabulary's words has a word vector: check model.word_embeddings (the vector file "
                "must use the tokenizer's lower-cased words) or train Word2Vec on the captions."
            )
        vectors = word_vectors.to(self.word_vectors.device, torch.float32)
        if self.config.pad_token_id is not None:
            vectors[self.config.pad_token_id] = 0.0
        ids, weights = knn_word_graph(vectors, self.config.num_neighbors, self.config.similarity_threshold)
        self.word_vectors.copy_(vectors)
        self.neighbor_ids.copy_(ids)
        self.neighbor_weights.copy_(weights)
        return covered

    def normalized_adjacency(self) -> torch.Tensor:
        """``Â`` of the stored word graph (sparse ``(V, V)``)."""
        return normalized_adjacency(adjacency_from_neighbors(self.neighbor_ids, self.neighbor_weights))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}.")
        if not bool(self.word_vectors.any()):
            raise ValueError(
                "This text GCN has no word vectors (all zero): call set_word_vectors(...) first. The training "
                "builders do it from the training captions (gensim Word2Vec) or from model.word_embeddings."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = attention_mask.bool()
        if self.config.pad_token_id is not None:
            valid = valid & (input_ids != self.config.pad_token_id)
        num_words = self.config.vocab_size
        counts = torch.zeros(input_ids.shape[0], num_words, device=input_ids.device)
        counts.scatter_add_(1, input_ids.clamp(0, num_words - 1), valid.float())
        adjacency = self.normalized_adjacency()
        # X W1 without materialising X = counts (x) e: row v of X W1 is count_v * (e_v W1)
        projected = counts.unsqueeze(-1) * (self.word_vectors @ self.layer1.weight).unsqueeze(0)
        hidden = self.layer1.propagate(adjacency, projected)
        hidden = self.layer2(adjacency, hidden)  # (B, V, H)
        # nodes within two hops of the caption's words (Â^2 counts > 0)
        reach = GraphConvolution.propagate(adjacency, GraphConvolution.propagate(adjacency, counts.unsqueeze(-1)))
        reached = reach.squeeze(-1) > 0
        if self.config.pooling == "max":
            pooled = hidden.masked_fill(~reached.unsqueeze(-1), -torch.inf).amax(dim=1)
            pooled = torch.where(reached.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))
        else:
            weights = reached.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        index = input_ids.clamp(0, num_words - 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        local = hidden.gather(1, index) * valid.unsqueeze(-1).to(hidden.dtype)
        return BaseModelOutputWithPooling(last_hidden_state=local, pooler_output=pooled)


__all__ = [
    "GraphConvolution",
    "PCMETextGCNModel",
    "adjacency_from_neighbors",
    "knn_word_graph",
    "normalized_adjacency",
]
