"""Label fusion: K atlases registered to one query, one label map out.

* :func:`majority_vote`: every voxel takes the label most atlases give it. **Ties go to the lowest label id**, so
  background (0) wins a tie against any structure, and structure 1 wins a tie against structure 2.
* :func:`weighted_vote`: every atlas's vote is weighted per voxel by how well its registered image matches the
  query image around that voxel (Artaechevarria et al., IEEE TMI 2009: inverse local mean squared difference;
  Sabuncu et al., IEEE TMI 2010: Gaussian-windowed similarity), either by a Gaussian-windowed local NCC
  (``"ncc"``, any intensity scaling) or by the inverse local mean squared difference (``"ssd"``, same modality and
  normalised intensities).
* :func:`staple`: binary STAPLE (Warfield et al., IEEE TMI 2004): expectation-maximisation of each atlas's
  sensitivity and specificity and of the probability of the hidden true mask.

Labels are tensors of one grid, ``[1, *S]`` or ``[*S]`` each (a sequence), or stacked ``[K, ...]``. Outputs keep the
first atlas's ``MetaTensor`` meta (affine) when it has one. Fusing K copies of the same atlas gives that atlas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .grid import smooth

__all__ = ["majority_vote", "weighted_vote", "local_weights", "staple"]


def _stack(items: Sequence[Tensor] | Tensor, name: str) -> tuple[Tensor, Tensor | None]:
    """``[K, *shape]`` plain tensor of the items, and the first item (for its meta) when it is a MetaTensor."""
    if isinstance(items, Tensor):
        first = None
        data = items.as_tensor() if hasattr(items, "as_tensor") else items
        if data.ndim < 2:
            raise ValueError(f"{name}: a stacked tensor must be [K, ...], got {tuple(data.shape)}.")
        return data, first
    items = list(items)
    if not items:
        raise ValueError(f"{name}: at least one atlas is needed.")
    shapes = {tuple(x.shape) for x in items}
    if len(shapes) != 1:
        raise ValueError(f"{name}: all atlases must have one shape, got {sorted(shapes)}.")
    first = items[0] if hasattr(items[0], "meta") else None
    data = torch.stack([x.as_tensor() if hasattr(x, "as_tensor") else x for x in items], 0)
    return data, first


def _wrap(out: Tensor, first: Tensor | None) -> Tensor:
    if first is None:
        return out
    from monai.data import MetaTensor

    return MetaTensor(out, affine=first.affine, meta={k: v for k, v in first.meta.items() if k != "affine"})


def _vote(scores: Tensor, ids: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Arg-max over label ids of ``scores`` ``[L, ...]``, ties to the lowest id (ids sorted ascending)."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    best = scores[order[0]].clone()
    arg = torch.full_like(best, ids[order[0]], dtype=torch.long)
    for i in order[1:]:
        take = scores[i] > best  # strict: an equal score keeps the lower id
        best = torch.where(take, scores[i], best)
        arg = torch.where(take, torch.full_like(arg, ids[i]), arg)
    return arg.to(dtype)


def _label_ids(data: Tensor, labels: Sequence[int] | None) -> list[int]:
    ids = sorted({int(v) for v in torch.unique(data).tolist()} | {0}) if labels is None else sorted(
        {0, *map(int, labels)})
    return ids


def majority_vote(labels: Sequence[Tensor] | Tensor, label_ids: Sequence[int] | None = None) -> Tensor:
    """Per-voxel majority of K label maps (multi-label or binary).

    Args:
        labels: K label maps of one grid (sequence of ``[1, *S]`` / ``[*S]`` or a stacked ``[K, ...]``).
        label_ids: labels to vote over (default: every value present; 0 is always background). A voxel whose
            votes all go to labels outside ``label_ids`` becomes 0.

    Returns:
        label map of the atlases' shape and dtype; ties go to the lowest label id (background wins ties).

    Raises:
        ValueError: no atlas, or atlases of different shapes.
    """
    data, first = _stack(labels, "majority_vote")
    ids = _label_ids(data, label_ids)
    counts = torch.stack([(data == i).sum(0) for i in ids], 0)
    return _wrap(_vote(counts, ids, data.dtype), first)


def local_weights(warped_images: Sequence[Tensor] | Tensor, target_image: Tensor, sigma: float = 2.0,
                  method: str = "ncc", power: float = 2.0, eps: float = 1e-6) -> Tensor:
    """Per-voxel weight of each atlas from the local similarity of its registered image to the target.

    Args:
        warped_images: K atlas images on the target grid, each ``[1, *S]`` (3D).
        target_image: the query image ``[1, *S]``.
        sigma: Gaussian window (voxels).
        method: ``"ncc"``: ``max(local NCC, 0) ** power`` (Gaussian-windowed means, variances and covariance);
            ``"ssd"``: ``(local mean squared difference + eps) ** -power`` (Artaechevarria's inverse-distance
            weights; use on intensities normalised alike).
        power: sharpness of the weighting.
        eps: floor of variances / distances.

    Returns:
        weights ``[K, *S]`` (float32, non-negative; not normalised).

    Raises:
        ValueError: unknown ``method`` or mismatched shapes.
    """
    imgs, _ = _stack(warped_images, "local_weights")
    tgt = target_image.as_tensor() if hasattr(target_image, "as_tensor") else target_image
    imgs = imgs.float().reshape(imgs.shape[0], 1, *imgs.shape[-3:])
    tgt = tgt.float().reshape(1, 1, *tgt.shape[-3:]).to(imgs.device)
    if imgs.shape[2:] != tgt.shape[2:]:
        raise ValueError(f"warped images {tuple(imgs.shape[2:])} and target {tuple(tgt.shape[2:])} differ.")
    g = lambda x: smooth(x, [sigma] * 3)  # noqa: E731
    if method == "ssd":
        return ((g((imgs - tgt) ** 2) + eps) ** (-power))[:, 0]
    if method != "ncc":
        raise ValueError(f"method must be 'ncc' or 'ssd', got {method!r}.")
    mt = g(tgt)
    vt = (g(tgt * tgt) - mt * mt).clamp_min(eps)
    out = []
    for k in range(imgs.shape[0]):
        x = imgs[k:k + 1]
        mx = g(x)
        vx = (g(x * x) - mx * mx).clamp_min(eps)
        ncc = (g(x * tgt) - mx * mt) / torch.sqrt(vx * vt)
        out.append(ncc.clamp(0.0, 1.0) ** power)
    return torch.cat(out, 0)[:, 0]


def weighted_vote(
    labels: Sequence[Tensor] | Tensor,
    warped_images: Sequence[Tensor] | Tensor,
    target_image: Tensor,
    sigma: float = 2.0,
    method: str = "ncc",
    power: float = 2.0,
    label_ids: Sequence[int] | None = None,
    return_weights: bool = False,
):
    """Locally weighted voting: each atlas's vote counts by its :func:`local_weights` at that voxel.

    Args:
        labels: K atlas label maps on the target grid.
        warped_images: the K atlas images registered to the target (same grid).
        target_image: the query image.
        sigma: Gaussian window (voxels) of the local similarity.
        method: ``"ncc"`` or ``"ssd"`` (see :func:`local_weights`).
        power: weighting sharpness.
        label_ids: labels to vote over (default: those present).
        return_weights: also return the weights ``[K, *S]``.

    Returns:
        the fused label map (ties to the lowest label id; where every weight is zero the weights fall back to
        equal, i.e. majority vote), and the weights when ``return_weights``.
    """
    data, first = _stack(labels, "weighted_vote")
    w = local_weights(warped_images, target_image, sigma=sigma, method=method, power=power).to(data.device)
    if w.shape[0] != data.shape[0]:
        raise ValueError(f"{data.shape[0]} label maps but {w.shape[0]} images.")
    w = w.reshape(data.shape[0], *data.shape[1:]) if w.numel() == data.numel() else w
    if w.shape != data.shape:
        raise ValueError(f"label maps {tuple(data.shape[1:])} and images {tuple(w.shape[1:])} differ in shape.")
    w = torch.where(w.sum(0, keepdim=True) > 0, w, torch.ones_like(w))
    ids = _label_ids(data, label_ids)
    scores = torch.stack([((data == i).float() * w).sum(0) for i in ids], 0)
    out = _wrap(_vote(scores, ids, data.dtype), first)
    return (out, w) if return_weights else out


def staple(
    labels: Sequence[Tensor] | Tensor,
    max_iter: int = 100,
    tol: float = 1e-7,
    prior: float | None = None,
    init: float = 0.99,
    threshold: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Binary STAPLE (Warfield, Zou and Wells, IEEE TMI 2004).

    With decisions ``D_jk`` (atlas ``j`` at voxel ``k``, nonzero is the structure), sensitivities ``p_j`` and
    specificities ``q_j``, the E-step sets ``W_k = P(T_k = 1 | D, p, q)`` from the prior ``f`` and the M-step
    ``p_j = sum_k W_k D_jk / sum_k W_k``, ``q_j = sum_k (1 - W_k)(1 - D_jk) / sum_k (1 - W_k)``, until the
    parameters change by less than ``tol``. Computed in the log domain, ``p, q`` clipped to ``[1e-6, 1 - 1e-6]``.

    Args:
        labels: K binary masks of one grid.
        max_iter: EM iterations at most.
        tol: stop when ``max |change of p, q| < tol``.
        prior: global prior probability of the structure (default: the mean of all decisions).
        init: initial sensitivity and specificity of every atlas.
        threshold: the returned mask is ``W > threshold``.

    Returns:
        ``(mask, probability W, sensitivity p [K], specificity q [K])``; ``mask`` has the atlases' dtype.
    """
    data, first = _stack(labels, "staple")
    d = (data != 0).float()
    k = d.shape[0]
    flat = d.reshape(k, -1)
    f = float(flat.mean()) if prior is None else float(prior)
    f = min(max(f, 1e-6), 1 - 1e-6)
    p = torch.full((k,), float(init), dtype=torch.float64, device=d.device)
    q = p.clone()
    lo, hi = 1e-6, 1 - 1e-6
    flat64 = flat.double()
    log_f = torch.log(torch.tensor(f, dtype=torch.float64, device=d.device))
    log_1f = torch.log(torch.tensor(1 - f, dtype=torch.float64, device=d.device))

    def e_step(p: Tensor, q: Tensor) -> Tensor:
        log_a = log_f + (flat64 * p.log()[:, None] + (1 - flat64) * (1 - p).log()[:, None]).sum(0)
        log_b = log_1f + ((1 - flat64) * q.log()[:, None] + flat64 * (1 - q).log()[:, None]).sum(0)
        return torch.sigmoid(log_a - log_b)

    for _ in range(max_iter):
        w = e_step(p, q)
        sw, sn = w.sum().clamp_min(1e-12), (1 - w).sum().clamp_min(1e-12)
        p_new = ((flat64 * w[None]).sum(1) / sw).clamp(lo, hi)
        q_new = (((1 - flat64) * (1 - w)[None]).sum(1) / sn).clamp(lo, hi)
        change = float(torch.max(torch.cat([(p_new - p).abs(), (q_new - q).abs()])))
        p, q = p_new, q_new
        if change < tol:
            break
    w = e_step(p, q)
    prob = w.reshape(d.shape[1:]).float()
    mask = _wrap((prob > threshold).to(data.dtype), first)
    return mask, prob, p.float(), q.float()
