"""Diff-ST's co-expression intensity gene graph (CIGC, superres task): the adjacency from training
data (:func:`coexpression_adjacency`, sparsified by :func:`topk_adjacency`) and the graph layer
over per-gene embeddings (:class:`GeneGraph`). Pure torch and numpy.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


# ========================================================================== CIGC gene graph
def coexpression_adjacency(expression: Any, binarize: bool = False) -> np.ndarray:
    """Co-expression-intensity gene graph A (G, G) from non-negative training data (n_obs, G).

    p(i|j) = sum_o min(x_oi, x_oj) / sum_o x_oj, the share of gene j's expression intensity that
    gene i co-expresses (with ``binarize`` the data are x > 0 and p(i|j) is the empirical
    P(i expressed | j expressed)); A_ij = (p(i|j) + p(j|i)) / 2, symmetric, in [0, 1], diagonal 1.
    A gene never expressed gets p(.|j) = 0 (only its self-loop). Accepts numpy, scipy sparse or
    torch; obs are rows.
    """
    if hasattr(expression, "toarray"):
        expression = expression.toarray()
    if isinstance(expression, Tensor):
        expression = expression.detach().cpu().numpy()
    x = np.asarray(expression, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expression must be (n_obs, genes), got shape {x.shape}")
    if not np.isfinite(x).all() or (x < 0).any():
        raise ValueError("expression for the co-expression graph must be finite and non-negative")
    if binarize:
        x = (x > 0).astype(np.float64)
    n_genes = x.shape[1]
    co = np.empty((n_genes, n_genes))
    for i in range(n_genes):  # sum_o min(x_oi, x_oj) for all j; O(n_obs * G^2)
        co[i] = np.minimum(x[:, i : i + 1], x).sum(axis=0)
    totals = x.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(totals[None, :] > 0, co / totals[None, :], 0.0)   # p[i, j] = p(i | j)
    adj = 0.5 * (p + p.T)
    np.fill_diagonal(adj, 1.0)
    silent = np.flatnonzero(totals == 0)
    if silent.size:
        log.warning("co-expression graph: %d gene(s) never expressed in the training data "
                    "(columns %s) get only a self-loop", silent.size, silent[:10].tolist())
    return adj


def topk_adjacency(adj: Any, k: int | None) -> np.ndarray:
    """The co-expression graph restricted to each gene's ``k`` strongest neighbours.

    Edge (i, j) is kept when j is among the k largest off-diagonal entries of row i or i among
    those of row j (a symmetric kNN graph: every gene keeps at least k neighbours, at most
    ~2k on average); the diagonal is kept. ``k`` None or >= genes - 1 returns ``adj`` unchanged
    (the dense graph). Ties are broken towards the lower gene index.
    """
    a = np.asarray(adj, dtype=np.float64)
    g = a.shape[0]
    if k is None or k >= g - 1:
        return a.copy()
    off = a.copy()
    np.fill_diagonal(off, -np.inf)
    nbr = np.argsort(-off, axis=1, kind="stable")[:, :int(k)]
    keep = np.zeros(a.shape, dtype=bool)
    keep[np.arange(g)[:, None], nbr] = True
    keep |= keep.T
    np.fill_diagonal(keep, True)
    return np.where(keep, a, 0.0)


def normalize_adjacency(adj: Tensor) -> Tensor:
    """Symmetric GCN normalisation D^-1/2 A D^-1/2 (D = row sums of A)."""
    deg = adj.sum(1)
    inv = torch.where(deg > 0, deg.clamp_min(1e-12).rsqrt(), torch.zeros_like(deg))
    return inv[:, None] * adj * inv[None, :]


class GeneGraph(nn.Module):
    """CIGC graph layer over gene nodes at every pixel.

    Each gene's map (B, G, H, W) is encoded by a shared conv to C channels, giving node features
    F_x (B, G, C, H, W); F_mid = ReLU(A_norm F_x W_g) (A over genes, W_g C x C, the same at every
    pixel); F_out = alpha F_mid + (1 - alpha) F_x. A defaults to the identity until
    :meth:`set_adjacency` is called; with ``topk`` it keeps each gene's ``topk`` strongest
    neighbours (:func:`topk_adjacency`). A graph with at most ``SPARSE_DENSITY`` of its G^2
    entries non-zero is applied as a sparse (CSR) product, O(edges x pixels); a denser one as
    one batched dense product (faster on CPU BLAS at a few hundred genes, the same numbers).
    """

    SPARSE_DENSITY = 0.05

    def __init__(self, n_genes: int, node_channels: int = 8, alpha: float = 0.2,
                 fixed_identity: bool = False, topk: int | None = None) -> None:
        super().__init__()
        self.n_genes, self.node_channels, self.alpha = n_genes, node_channels, alpha
        self.fixed_identity = bool(fixed_identity)
        self.topk = None if topk is None else int(topk)
        self._sparse: tuple[int, Tensor] | None = None
        self.encode = nn.Sequential(nn.Conv2d(1, node_channels, 3, padding=1), nn.SiLU())
        self.w_g = nn.Parameter(torch.empty(node_channels, node_channels))
        nn.init.kaiming_uniform_(self.w_g, a=math.sqrt(5))
        self.register_buffer("adjacency", torch.eye(n_genes))
        self.register_buffer("adjacency_set", torch.tensor(False))
        self._warned = False

    def set_adjacency(self, adj: Any) -> None:
        """Store D^-1/2 A D^-1/2 of a raw (G, G) adjacency (e.g. :func:`coexpression_adjacency`).
        A graph built with ``fixed_identity=True`` (the CIGC ablation) keeps the identity."""
        if self.fixed_identity:
            log.info("CIGC ablation: the gene graph keeps its identity adjacency")
            return
        a = torch.as_tensor(np.asarray(adj), dtype=torch.float32)
        if a.shape != (self.n_genes, self.n_genes):
            raise ValueError(f"adjacency must be ({self.n_genes}, {self.n_genes}), "
                             f"got {tuple(a.shape)}")
        if not torch.isfinite(a).all() or (a < 0).any():
            raise ValueError("adjacency must be finite and non-negative")
        a = torch.as_tensor(topk_adjacency(a.numpy(), self.topk), dtype=torch.float32)
        self.adjacency.copy_(normalize_adjacency(a).to(self.adjacency))
        self.adjacency_set.fill_(True)

    def forward(self, maps: Tensor) -> Tensor:
        if not bool(self.adjacency_set) and not self._warned and not self.fixed_identity:
            log.warning("CIGC graph used before set_adjacency(): identity adjacency, genes are "
                        "not coupled")
            self._warned = True
        b, g, h, w = maps.shape
        nodes = self.encode(maps.reshape(b * g, 1, h, w)).reshape(b, g, self.node_channels, h, w)
        mixed = self.mix(nodes)
        mid = F.relu(torch.einsum("bichw,cd->bidhw", mixed, self.w_g))
        return self.alpha * mid + (1.0 - self.alpha) * nodes

    def mix(self, nodes: Tensor) -> Tensor:
        """A_norm applied over the gene axis of node features (B, G, ...): sum_j A_ij F_j."""
        b, g = nodes.shape[:2]
        flat = nodes.reshape(b, g, -1)
        sparse = self._sparse_adjacency()
        if sparse is None:
            return (self.adjacency.to(nodes.dtype) @ flat).reshape(nodes.shape)
        # CPU sparse kernels have no bf16: the product runs in fp32
        out = torch.stack([sparse @ flat[i].float() for i in range(b)])
        return out.to(nodes.dtype).reshape(nodes.shape)

    def _sparse_adjacency(self) -> Tensor | None:
        """CSR copy of the adjacency when it is sparse enough (cached until it changes)."""
        adj = self.adjacency
        key = (adj._version, adj.data_ptr(), adj.device)
        if self._sparse is None or self._sparse[0] != key:
            csr = None
            if int(torch.count_nonzero(adj)) <= self.SPARSE_DENSITY * adj.numel():
                with warnings.catch_warnings():   # "sparse CSR support is in beta state"
                    warnings.filterwarnings("ignore", category=UserWarning)
                    csr = adj.to_sparse_csr()
            self._sparse = (key, csr)
        return self._sparse[1]
