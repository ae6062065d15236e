"""Matching Networks (Vinyals et al., 2016).

A query is classified by attention over the labelled support set: with embeddings ``f`` (query) and ``g`` (support),

* attention ``a(q, s_i) = softmax_i(scale * cos(f(q), g(s_i)))`` over the support samples ``i``;
* class probabilities ``p(c | q) = sum_i a(q, s_i) [y_i == c]``.

Predictors (and :meth:`MatchingNet.forward`) return ``log(p + eps)`` as their ``[B, N]`` logits, so that
``logits.softmax(1)`` gives back ``p`` (up to ``eps``: exactly ``(p + eps) / (1 + N * eps)``) and ``logits.argmax(1)``
is the most probable class; the log is computed in log-space (``logsumexp``), so it stays finite and accurate when
``p`` is tiny. Training minimises the query negative log-likelihood of these log-probabilities by ordinary
back-propagation into the encoder, so the default :meth:`~monai_metalearn.learners.base.Learner.outer_step` applies.

Without full-context embeddings (``fce=False``, the default) ``f = g = encoder``. With ``fce=True`` the paper's
full-context embeddings are used, both keeping the encoder's feature size ``F``:

* support: ``g(s_i) = g'(s_i) + h_fwd_i + h_bwd_i``, a bidirectional LSTM (hidden size ``F``) over the support set in
  its given order, with a skip connection (:class:`SupportContextEncoder`);
* query: the attention LSTM of the paper's appendix, ``fce_steps`` processing steps over the (contextualised) support
  embeddings with dot-product attention and a skip connection (:class:`QueryContextEncoder`).

Two interfaces: the learner contract (:meth:`MatchingNet.meta_loss`, :meth:`MatchingNet.adapt` returning a
:class:`MatchingPredictor`) and easyfsl's two calls (``process_support_set(x, y)`` then ``forward(query_x)``).

BatchNorm: ``"transductive"`` (default: support and query batches each normalised with their own statistics, running
statistics untouched) or ``"frozen"`` (running statistics, e.g. for a pretrained MONAI backbone); see
:mod:`monai_metalearn.networks.batchnorm`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monai_metalearn.networks.batchnorm import batch_norm_mode, check_batch_norm_mode

from .base import Learner, accuracy, check_episode

__all__ = [
    "FullContextEmbedding",
    "MatchingNet",
    "MatchingPredictor",
    "QueryContextEncoder",
    "SupportContextEncoder",
    "matching_attention",
    "matching_log_probs",
]

_LABELS_ERROR = "MatchingNet needs 1-D integer class labels in support_y"


def matching_attention(query_features: Tensor, support_features: Tensor, scale: Tensor | float = 10.0) -> Tensor:
    """Attention ``[Q, S]`` of each query over the support samples: ``softmax_i(scale * cos(q, s_i))``."""
    cos = F.normalize(query_features, dim=-1) @ F.normalize(support_features, dim=-1).t()
    return (scale * cos.float()).softmax(dim=1)


def matching_log_probs(
    query_features: Tensor,
    support_features: Tensor,
    support_labels: Tensor,
    n_way: int,
    scale: Tensor | float = 10.0,
    eps: float = 1e-8,
) -> Tensor:
    """Matching-network log-probabilities ``log(p(c | q) + eps)``, ``[Q, N]`` (float32).

    ``p(c | q) = sum_i a(q, s_i) [y_i == c]`` with ``a(q, s_i) = softmax_i(scale * cos(q, s_i))``, computed in
    log-space: ``log p(c | q) = logsumexp_{i: y_i = c}(scale * cos_i) - logsumexp_i(scale * cos_i)``, then
    ``log(p + eps) = logaddexp(log p, log eps)`` (``eps=0``: exact ``log p``). ``softmax(1)`` of the result is ``p``
    up to ``eps``.

    Args:
        query_features: ``[Q, F]`` query embeddings ``f(q)``.
        support_features: ``[S, F]`` support embeddings ``g(s_i)``.
        support_labels: ``[S]`` class ids in ``0..n_way-1``.
        n_way: number of classes ``N``.
        scale: cosine temperature.
        eps: added to ``p`` before the log (bounds the loss of a query at ``-log(eps)``).

    Raises:
        ValueError: for mismatched shapes, labels outside ``0..n_way-1``, a class without support samples, or a
            negative ``eps``.
    """
    if query_features.dim() != 2 or support_features.dim() != 2 or query_features.shape[1] != support_features.shape[1]:
        raise ValueError(
            f"query_features {tuple(query_features.shape)} and support_features {tuple(support_features.shape)} "
            "must be [Q, F] and [S, F]"
        )
    if support_labels.dim() != 1 or support_labels.shape[0] != support_features.shape[0]:
        raise ValueError(
            f"support_features {tuple(support_features.shape)} and support_labels {tuple(support_labels.shape)} "
            "do not match"
        )
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if support_labels.numel() and (int(support_labels.min()) < 0 or int(support_labels.max()) >= n_way):
        raise ValueError(f"support_labels outside 0..{n_way - 1}: {torch.unique(support_labels).tolist()}")
    one_hot = F.one_hot(support_labels, n_way).bool()  # [S, N]
    empty = ~one_hot.any(0)
    if bool(empty.any()):
        raise ValueError(f"classes without support samples: {torch.nonzero(empty).flatten().tolist()}")
    cos = F.normalize(query_features, dim=-1) @ F.normalize(support_features, dim=-1).t()
    scores = scale * cos.float()  # [Q, S]
    per_class = scores[:, :, None].masked_fill(~one_hot[None], float("-inf"))  # [Q, S, N]
    log_p = torch.logsumexp(per_class, dim=1) - torch.logsumexp(scores, dim=1, keepdim=True)  # [Q, N]
    if eps == 0:
        return log_p
    return torch.logaddexp(log_p, torch.full_like(log_p, math.log(eps)))


class SupportContextEncoder(nn.Module):
    """Full-context support embeddings ``g``: ``g'(s_i) + h_fwd_i + h_bwd_i`` of a bidirectional LSTM over the
    support set (hidden size = feature size ``F``, so the skip connection keeps ``F``).

    Args:
        feature_dim: ``F``.
    """

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.lstm = nn.LSTM(self.feature_dim, self.feature_dim, batch_first=True, bidirectional=True)

    def forward(self, support_features: Tensor) -> Tensor:
        """``[S, F] -> [S, F]``: the support set is read as one sequence, in its given order."""
        out, _ = self.lstm(support_features[None])  # [1, S, 2F]
        out = out[0]
        return support_features + out[:, : self.feature_dim] + out[:, self.feature_dim :]


class QueryContextEncoder(nn.Module):
    """Full-context query embeddings ``f``: the attention LSTM of Vinyals et al. (2016, appendix A.2).

    With ``f'(q)`` the encoder features, ``h_0 = f'(q)``, ``c_0 = 0`` and for ``k = 1..steps``:
    ``r = sum_i softmax_i(h^T g(s_i)) g(s_i)`` (readout of the support embeddings), ``(h_hat, c) = LSTMCell([f'(q), r],
    (h, c))``, ``h = h_hat + f'(q)``; the output is the last ``h`` (size ``F``). The paper feeds ``[h, r]`` as the
    hidden state; here ``r`` joins the input instead (as easyfsl does), which keeps the hidden size at ``F``.

    Args:
        feature_dim: ``F``.
        steps: processing steps ``K`` (>= 1).
    """

    def __init__(self, feature_dim: int, steps: int = 3) -> None:
        super().__init__()
        if int(steps) < 1:
            raise ValueError(f"fce_steps must be >= 1, got {steps}")
        self.feature_dim = int(feature_dim)
        self.steps = int(steps)
        self.cell = nn.LSTMCell(2 * self.feature_dim, self.feature_dim)

    def forward(self, query_features: Tensor, support_features: Tensor) -> Tensor:
        """``[Q, F]``, ``[S, F] -> [Q, F]``."""
        h = query_features
        c = torch.zeros_like(query_features)
        for _ in range(self.steps):
            attention = (h @ support_features.t()).softmax(dim=1)  # [Q, S]
            readout = attention @ support_features  # [Q, F]
            h_hat, c = self.cell(torch.cat([query_features, readout], dim=1), (h, c))
            h = h_hat + query_features
        return h


class FullContextEmbedding(nn.Module):
    """Both full-context embeddings of a matching network: ``support`` (:class:`SupportContextEncoder`) and
    ``query`` (:class:`QueryContextEncoder`), for encoder features of size ``feature_dim``.

    Args:
        feature_dim: ``F``.
        steps: processing steps of the query attention LSTM.
    """

    def __init__(self, feature_dim: int, steps: int = 3) -> None:
        super().__init__()
        self.support = SupportContextEncoder(feature_dim)
        self.query = QueryContextEncoder(feature_dim, steps)


class MatchingPredictor:
    """Predictor holding the (detached) support embeddings: ``x -> log(p(c | x) + eps)`` ``[B, N]``.

    ``predictor(x).softmax(1)`` are the matching-network class probabilities.

    Args:
        learner: the :class:`MatchingNet` (its encoder, FCE modules, scale, eps and BatchNorm mode are used).
        support_features: ``[S, F]`` support embeddings ``g(s_i)``.
        support_labels: ``[S]`` class ids.
        n_way: number of classes ``N``.
    """

    def __init__(self, learner: MatchingNet, support_features: Tensor, support_labels: Tensor, n_way: int) -> None:
        self.learner = learner
        self.support_features = support_features
        self.support_labels = support_labels
        self.n_way = int(n_way)

    def __call__(self, x: Tensor) -> Tensor:
        return self.learner.logits(x, self.support_features, self.support_labels, self.n_way)


class MatchingNet(Learner):
    """Matching network learner.

    Args:
        encoder: maps ``[B, C, D, H, W]`` to ``[B, F]`` (e.g. :class:`~monai_metalearn.networks.ConvEncoder3D`).
        scale: cosine temperature of the attention (> 0).
        learn_scale: learn the temperature.
        fce: full-context embeddings (bidirectional support LSTM, attention LSTM for queries), held in
            ``self.context`` (a :class:`FullContextEmbedding`; ``None`` without ``fce``).
        fce_steps: processing steps of the query attention LSTM.
        feature_dim: ``F``, needed by ``fce``; default ``encoder.out_features`` when the encoder has it.
        n_way: expected classes per episode; inferred when ``None``.
        batch_norm: ``"transductive"`` or ``"frozen"``.
        eps: added to the probabilities before the log (see :func:`matching_log_probs`).

    Raises:
        ValueError: for a non-positive ``scale``, ``fce_steps < 1``, a negative ``eps``, or ``fce=True`` without a
            known ``feature_dim``.

    Example::

        learner = MatchingNet(ConvEncoder3D(features=(16, 32, 64)), fce=True)
        loss, metrics = learner.meta_loss(sx, sy, qx, qy)
        probs = learner.adapt(sx, sy)(qx).softmax(1)  # p(c | q)
        learner.process_support_set(sx, sy)  # easyfsl style
        logits = learner(qx)
    """

    def __init__(
        self,
        encoder: nn.Module,
        scale: float = 10.0,
        learn_scale: bool = False,
        fce: bool = False,
        fce_steps: int = 3,
        feature_dim: int | None = None,
        n_way: int | None = None,
        batch_norm: str = "transductive",
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if int(fce_steps) < 1:
            raise ValueError(f"fce_steps must be >= 1, got {fce_steps}")
        self.encoder = encoder
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))
        if feature_dim is None:
            feature_dim = getattr(encoder, "out_features", None)
        self.feature_dim = None if feature_dim is None else int(feature_dim)
        self.fce = bool(fce)
        self.fce_steps = int(fce_steps)
        if self.fce:
            if self.feature_dim is None:
                raise ValueError(
                    "fce=True needs feature_dim (the encoder's output size): pass feature_dim=, or use an encoder "
                    "with an out_features attribute"
                )
            self.context: FullContextEmbedding | None = FullContextEmbedding(self.feature_dim, self.fce_steps)
        else:
            self.context = None
        self.n_way = n_way
        self.batch_norm = check_batch_norm_mode(batch_norm)
        self.eps = float(eps)
        self.support_features: Tensor | None = None
        self.support_labels: Tensor | None = None
        self._stored_n_way: int | None = None

    def embed(self, x: Tensor) -> Tensor:
        """Encoder features ``[B, F]`` under the learner's BatchNorm mode (checked against ``feature_dim`` with FCE)."""
        with batch_norm_mode(self.encoder, self.batch_norm):
            features = self.encoder(x)
        if self.fce and (features.dim() != 2 or features.shape[1] != self.feature_dim):
            raise ValueError(
                f"the encoder gives features of shape {tuple(features.shape)} but the FCE LSTMs were built for "
                f"feature_dim={self.feature_dim}"
            )
        return features

    def embed_support(self, support_x: Tensor) -> Tensor:
        """Support embeddings ``g`` ``[S, F]``: encoder features, through the support LSTM when ``fce``."""
        features = self.embed(support_x)
        return self.context.support(features) if self.context is not None else features

    def embed_query(self, query_x: Tensor, support_features: Tensor) -> Tensor:
        """Query embeddings ``f`` ``[Q, F]``: encoder features, through the attention LSTM over ``support_features``
        (the output of :meth:`embed_support`) when ``fce``."""
        features = self.embed(query_x)
        return self.context.query(features, support_features) if self.context is not None else features

    def logits(self, query_x: Tensor, support_features: Tensor, support_labels: Tensor, n_way: int) -> Tensor:
        """``log(p(c | q) + eps)`` ``[Q, N]`` of the query images against support embeddings ``g``."""
        query_features = self.embed_query(query_x, support_features)
        return matching_log_probs(query_features, support_features, support_labels, n_way, self.scale, self.eps)

    def _check(self, support_x: Tensor, support_y: Tensor, query_x=None, query_y=None) -> int:
        n_way = check_episode(support_x, support_y, query_x, query_y, self.n_way)
        if n_way is None:
            raise ValueError(
                f"{_LABELS_ERROR} (classification only), got shape {tuple(support_y.shape)} dtype {support_y.dtype}"
            )
        return n_way

    def meta_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Negative log-likelihood of the query labels under the attention over the support set.

        Raises:
            ValueError: for a malformed episode (classification labels are required).
        """
        n_way = self._check(support_x, support_y, query_x, query_y)
        log_probs = self.logits(query_x, self.embed_support(support_x), support_y, n_way)
        loss = F.nll_loss(log_probs, query_y)
        return loss, {"loss": float(loss.detach()), "accuracy": accuracy(log_probs, query_y)}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> MatchingPredictor:
        """Embed the support set (detached) and return a :class:`MatchingPredictor`.

        Raises:
            ValueError: for a malformed support set.
        """
        n_way = self._check(support_x, support_y)
        with torch.no_grad():
            support_features = self.embed_support(support_x)
        return MatchingPredictor(self, support_features, support_y, n_way)

    def process_support_set(self, support_x: Tensor, support_y: Tensor) -> None:
        """easyfsl-style: embed and store the support set (with graph, if gradients are enabled).

        Raises:
            ValueError: for a malformed support set.
        """
        self._stored_n_way = self._check(support_x, support_y)
        self.support_features = self.embed_support(support_x)
        self.support_labels = support_y

    def forward(self, query_x: Tensor) -> Tensor:
        """easyfsl-style: ``log(p + eps)`` of ``query_x`` against the support set stored by
        :meth:`process_support_set`.

        Raises:
            RuntimeError: if :meth:`process_support_set` was not called first.
        """
        if self.support_features is None or self.support_labels is None or self._stored_n_way is None:
            raise RuntimeError("call process_support_set(support_x, support_y) before forward(query_x)")
        return self.logits(query_x, self.support_features, self.support_labels, self._stored_n_way)
