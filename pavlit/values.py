"""Value maths of docs/method.md §2–§3 as pure, batched, masked tensor functions.

Shapes follow one convention: a response with ``H`` steps has ``H + 1`` prefix values ``values[..., 0..H]``,
where ``values[..., 0]`` is the question-only prefix (h = 0) and ``values[..., h]`` the prefix that ends with
step ``h``. Advantages are per step, ``[..., H]``. Masks are boolean (True = real) and mark padding in ragged
batches; masked positions never reach a result, so padding may hold anything, NaN included.

Every function checks its inputs (probabilities in [0, 1], advantages in [-1, 1], counts consistent) and
raises ``ValueError`` naming the offending argument; checks read only unmasked entries.
"""

from __future__ import annotations

import torch

__all__ = [
    "advantages",
    "alignment",
    "best_of_k",
    "best_of_k_from_counts",
    "distinguishability",
    "effective_reward",
    "first_pit",
    "mc_estimate",
]

TensorLike = torch.Tensor | float | int


def _as_float(x: TensorLike) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _check_range(name: str, x: torch.Tensor, low: float, high: float, mask: torch.Tensor | None = None) -> None:
    ok = (x >= low) & (x <= high)  # False for NaN
    if mask is not None:
        ok = ok | ~mask
    if not bool(ok.all()):
        bad = x[~ok] if mask is None else x[~ok & mask]
        raise ValueError(f"{name} must lie in [{low}, {high}] (and not be NaN); got e.g. {bad.flatten()[:3].tolist()}")


def _as_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def mc_estimate(n_correct: TensorLike, n_rollouts: TensorLike) -> torch.Tensor:
    """Monte-Carlo value ``Q̂ = n_correct / n_rollouts``.

    Args:
        n_correct: Number of correct rollouts, any shape.
        n_rollouts: Number of rollouts, broadcastable with ``n_correct``.

    Returns:
        The float fraction (default dtype).

    Raises:
        ValueError: If ``n_rollouts <= 0``, ``n_correct < 0`` or ``n_correct > n_rollouts``.
    """
    n_correct, n_rollouts = torch.as_tensor(n_correct), torch.as_tensor(n_rollouts)
    if not bool((n_rollouts > 0).all()):
        raise ValueError("n_rollouts must be positive")
    if not bool(((n_correct >= 0) & (n_correct <= n_rollouts)).all()):
        raise ValueError("n_correct must lie in [0, n_rollouts]")
    dtype = torch.get_default_dtype()
    return n_correct.to(dtype) / n_rollouts.to(dtype)


def best_of_k(q: TensorLike, k: TensorLike) -> torch.Tensor:
    """Value of the Best-of-K prover: ``1 − (1 − q)^k`` (docs/method.md §2).

    Computed as a power (not ``expm1``/``log1p``) so that gradients stay finite at ``q = 1``.

    Args:
        q: ``Q^π`` in [0, 1], any shape.
        k: Number of attempts, an integer ≥ 1 (or a tensor of them broadcastable with ``q``).

    Returns:
        ``Q^{BoK}`` shaped like the broadcast of ``q`` and ``k``.
    """
    q = _as_float(q)
    _check_range("q", q, 0.0, 1.0)
    k = torch.as_tensor(k, device=q.device)
    if k.is_floating_point() and not bool((k == k.round()).all()):
        raise ValueError("k must be an integer")
    if not bool((k >= 1).all()):
        raise ValueError("k must be at least 1")
    return 1.0 - (1.0 - q) ** k.to(q.dtype)


def best_of_k_from_counts(n_correct: TensorLike, n_rollouts: TensorLike, k: TensorLike) -> torch.Tensor:
    """Unbiased estimate of ``1 − (1 − p)^k`` from ``n`` rollouts of which ``c`` are correct.

    The estimator is ``1 − C(n − c, k) / C(n, k)`` (the chance that a random k-subset of the n rollouts holds a
    correct one), computed as the product ``Π_{i<k} (n − c − i) / (n − i)`` in float64, never with factorials.

    Args:
        n_correct: ``c``, any shape.
        n_rollouts: ``n``, broadcastable.
        k: Subset size, ``1 ≤ k ≤ n``, broadcastable.

    Returns:
        The estimate (default dtype), shaped like the broadcast inputs.
    """
    c, n, k = (torch.as_tensor(x) for x in (n_correct, n_rollouts, k))
    if any(x.is_floating_point() and not bool((x == x.round()).all()) for x in (c, n, k)):
        raise ValueError("n_correct, n_rollouts and k must be integers")
    if not bool((n > 0).all()):
        raise ValueError("n_rollouts must be positive")
    if not bool(((c >= 0) & (c <= n)).all()):
        raise ValueError("n_correct must lie in [0, n_rollouts]")
    if not bool(((k >= 1) & (k <= n)).all()):
        raise ValueError("k must lie in [1, n_rollouts]")
    c, n, k = torch.broadcast_tensors(c.double(), n.double(), k.double())
    steps = torch.arange(int(k.max().item()), dtype=torch.float64, device=k.device)
    # Factors past the first zero may turn negative; the product is already 0 there, and the clamp keeps it so.
    factors = ((n[..., None] - c[..., None] - steps) / (n[..., None] - steps)).clamp(min=0.0)
    factors = torch.where(steps < k[..., None], factors, torch.ones_like(factors))
    return (1.0 - factors.prod(dim=-1)).to(torch.get_default_dtype())


def _step_mask(mask: torch.Tensor | None, n_values: int) -> torch.Tensor | None:
    """A mask over steps ``[..., H]`` from a mask over steps or over values ``[..., H+1]``."""
    if mask is None:
        return None
    mask = _as_mask(mask)
    if mask.shape[-1] == n_values:
        return mask[..., 1:] & mask[..., :-1]
    if mask.shape[-1] == n_values - 1:
        return mask
    raise ValueError(f"mask's last dimension must be H ({n_values - 1}, over steps) or H+1 ({n_values}, over values)")


def advantages(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-step advantages as consecutive differences of prefix values (docs/method.md §1–§2).

    ``A(s_h, a_h) = V(prefix_h) − V(prefix_{h−1})``, i.e. ``values[..., 1:] − values[..., :-1]``.

    Args:
        values: ``[..., H+1]`` prefix values in [0, 1]; column 0 is the question-only prefix.
        mask: Either over **steps**, ``[..., H]`` (True where step h is real; its two values must be real), or
            over **values**, ``[..., H+1]`` (step h is real when values h−1 and h both are). The two are told
            apart by the size of the last dimension.

    Returns:
        ``[..., H]`` advantages, exactly 0 at masked steps.
    """
    if values.dim() == 0 or values.shape[-1] < 1:
        raise ValueError("values must have a last dimension of size H+1 >= 1")
    steps = _step_mask(mask, values.shape[-1])
    if steps is None:
        _check_range("values", values, 0.0, 1.0)
        return values[..., 1:] - values[..., :-1]
    used = torch.zeros(steps.shape[:-1] + (values.shape[-1],), dtype=torch.bool, device=steps.device)
    used[..., 1:] |= steps
    used[..., :-1] |= steps
    _check_range("values", values, 0.0, 1.0, used)
    diff = values[..., 1:] - values[..., :-1]
    return torch.where(steps, diff, torch.zeros_like(diff))


def effective_reward(q_pi: TensorLike, a_mu: TensorLike, alpha: TensorLike) -> torch.Tensor:
    """The effective reward ``Q^π + α · A^μ`` used by search and RL (docs/method.md §2).

    Args:
        q_pi: ``Q^π`` of the step (or the rollout's outcome), in [0, 1].
        a_mu: The step's advantage under the prover, in [-1, 1].
        alpha: Weight of the advantage, finite (a float or a broadcastable tensor).

    Returns:
        The broadcast sum.
    """
    q_pi, a_mu, alpha = _as_float(q_pi), _as_float(a_mu), _as_float(alpha)
    _check_range("q_pi", q_pi, 0.0, 1.0)
    _check_range("a_mu", a_mu, -1.0, 1.0)
    if not bool(torch.isfinite(alpha).all()):
        raise ValueError("alpha must be finite")
    return q_pi + alpha * a_mu


def first_pit(q: torch.Tensor, mask: torch.Tensor | None = None, threshold: float = 0.0) -> torch.Tensor:
    """Index of the first step whose prefix value is ``≤ threshold`` (docs/method.md §3, first-pit seeding).

    Args:
        q: ``[..., H+1]`` prefix values (column 0, the question-only prefix, is never a pit).
        mask: Over steps ``[..., H]``, or over values ``[..., H+1]`` (step h is real when value h is); told
            apart by size as in :func:`advantages`. Masked steps are never pits.
        threshold: A step is a pit when its value is at most this (0.0: where ``Q̂`` drops to 0).

    Returns:
        ``[...]`` long tensor: the first pit's step index ``h ≥ 1``, or -1 where there is none.
    """
    if q.dim() == 0 or q.shape[-1] < 1:
        raise ValueError("q must have a last dimension of size H+1 >= 1")
    step_values = q[..., 1:]
    if step_values.shape[-1] == 0:
        return torch.full(q.shape[:-1], -1, dtype=torch.long, device=q.device)
    if mask is None:
        steps = torch.ones_like(step_values, dtype=torch.bool)
    elif _as_mask(mask).shape[-1] == q.shape[-1]:
        steps = _as_mask(mask)[..., 1:]  # a step is real when its own value is
    else:
        steps = _step_mask(mask, q.shape[-1])
    _check_range("q", step_values, 0.0, 1.0, steps)
    hit = (step_values <= threshold) & steps
    first = hit.to(torch.uint8).argmax(dim=-1) + 1  # argmax returns the first maximal index
    return torch.where(hit.any(dim=-1), first, torch.full_like(first, -1))


def _group_weights(a: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if a.dim() < 2:
        raise ValueError("advantages must be shaped [..., S, N]: N actions at each of S states")
    if mask is None:
        return torch.ones_like(a)
    if mask.shape != a.shape:
        raise ValueError(f"mask must have the advantages' shape {tuple(a.shape)}, got {tuple(mask.shape)}")
    weights = mask.to(a.dtype)
    if not bool(((weights >= 0) & torch.isfinite(weights)).all()):
        raise ValueError("mask weights must be finite and non-negative")
    return weights


def _mean_over_states(per_state: torch.Tensor, group_weight: torch.Tensor) -> torch.Tensor:
    has_actions = group_weight > 0
    if not bool(has_actions.any(dim=-1).all()):
        raise ValueError("need at least one state with an unmasked action (in every batch entry)")
    per_state = torch.where(has_actions, per_state, torch.zeros_like(per_state))
    return per_state.sum(dim=-1) / has_actions.sum(dim=-1)


def distinguishability(a_mu: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``E_s Var_{a~π}[A^μ(s, a)]`` from grouped rollouts (docs/method.md §2, Theorem 3.1).

    The variance is the **population** variance of each group (divide by the group's weight, not weight − 1):
    exact when a group enumerates every action with its probability as weight, and biased by ``(N − 1) / N``
    when the group holds N samples. States count equally in the outer mean.

    Args:
        a_mu: ``[..., S, N]`` prover advantages of N actions drawn from π at each of S states.
        mask: ``[..., S, N]`` True for real actions in ragged groups; float values act as weights (e.g. π's
            probabilities when the group enumerates actions). States without any action are skipped.

    Returns:
        ``[...]`` (a scalar for ``[S, N]`` input).
    """
    a_mu = _as_float(a_mu)
    weights = _group_weights(a_mu, mask)
    _check_range("a_mu", a_mu, -1.0, 1.0, weights > 0)
    a_mu = torch.where(weights > 0, a_mu, torch.zeros_like(a_mu))
    total = weights.sum(dim=-1)
    safe_total = total.clamp(min=torch.finfo(a_mu.dtype).tiny)
    mean = (weights * a_mu).sum(dim=-1) / safe_total
    variance = (weights * (a_mu - mean[..., None]) ** 2).sum(dim=-1) / safe_total
    return _mean_over_states(variance, total)


def alignment(a_mu: torch.Tensor, a_pi: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``E_s E_{a~π}[A^μ(s, a) · A^π(s, a)]`` from grouped rollouts (docs/method.md §2, Theorem 3.1).

    Args:
        a_mu: ``[..., S, N]`` prover advantages.
        a_pi: ``[..., S, N]`` base-policy advantages of the same actions.
        mask: As in :func:`distinguishability`.

    Returns:
        ``[...]`` (a scalar for ``[S, N]`` input).
    """
    a_mu, a_pi = _as_float(a_mu), _as_float(a_pi)
    if a_mu.shape != a_pi.shape:
        raise ValueError(f"a_mu and a_pi must have the same shape, got {tuple(a_mu.shape)} and {tuple(a_pi.shape)}")
    weights = _group_weights(a_mu, mask)
    _check_range("a_mu", a_mu, -1.0, 1.0, weights > 0)
    _check_range("a_pi", a_pi, -1.0, 1.0, weights > 0)
    product = torch.where(weights > 0, a_mu * a_pi, torch.zeros_like(a_mu))
    total = weights.sum(dim=-1)
    per_state = (weights * product).sum(dim=-1) / total.clamp(min=torch.finfo(a_mu.dtype).tiny)
    return _mean_over_states(per_state, total)
