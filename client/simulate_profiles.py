"""Denoising dynamics for the simulator (canvaswatch.client.simulate), calibrated to the real model.

SIMULATED, not model output. A `Profile` says how a canvas of real text is
denoised: when each position's top-1 token becomes its final one for good (its
*lock step*), what the top-1 shows before that, and how much probability the
kept top-k tokens carry at every step. The numbers below were chosen to match
statistics of real DiffusionGemma (google/diffusiongemma-26B-A4B-it) captures
read off the development data named in BENCHMARKS.md; the data itself is not
in this repository. tests/client/test_simulate_calibration.py states each
target number, where it was read, and the tolerance the profiles meet.

What the captures show, and how each profile part reproduces it:

- Commit order. Positions lock roughly left to right with wide jitter
  (Spearman's rho between position and lock step ~0.78 under the default
  sampler) and padding is decided at once. Here a position's lock step is
  floor(exp(mu + sigma * z) - shift) with z = a * Phi^-1(u) + sqrt(1 - a^2) * e,
  u its quantile among the canvas's content positions and e ~ N(0, 1): a
  shifted log-normal marginal (it fits the real lock-step distributions
  within ~0.02 at every step for the default sampler, ~0.05 for the hot
  one) joined to the position by a Gaussian copula whose weight
  `order_corr` sets the rank correlation.
- Changes per step. Before it locks, a position's top-1 is a draft that is
  replaced with probability `change_prob` at each step. Drafts are what the
  real argmax shows there: mostly the text's most frequent tokens (" the",
  ",", "." in English), else tokens of the text a few positions away, now and
  then the position's own final token. At the lock step the top-1 becomes the
  final token and stays.
- Entropy. Every position and step gets an entropy in nats: undecided
  positions follow `floor + (start - floor) * exp(-(step / decay) ** shape)`,
  locked ones fall from `locked_entropy` by `locked_decay` a step; each value is jittered
  (log-normal, `entropy_jitter`). The kept probabilities are then those of a
  geometric distribution p_i = (1 - q) q^i with that entropy, cut at k: at
  1.9-2.8 nats the top-1 holds 0.35-0.15 and the next slots 0.1-0.25 each,
  what real undecided positions carry; at 0.05 nats the top-1 holds 0.99.
  `topk_entropy` reads the entropy back from a top-k row the same way, so a
  trace's entropy can be checked without the full distribution.
- The hot sampler (temperature 1.3 -> 0.8, entropy bound 0.3) also decides
  late: its argmax locks by step ~12 but the sampler accepts a position only
  at step ~30 (whatever the position; ~1 in 8 soon after its lock). Between
  the two the top-1 is the final token with its entropy falling from
  `locked_entropy` to `accepted_entropy`; `accept_*` give the acceptance
  step's distribution.
- Answers. When a request names its answer's positions, the answer is
  written first and stays (lock step 0) or, with probability
  `answer_revise_prob`, shows other tokens before its own, locking at a step
  drawn like the others (`answer_lock_*`). Drafts stay under the monitors'
  settle probability: the real model revises an answer within a few steps,
  before it would count as settled. (The captures have answers under the
  default sampler only; the hot profiles' answer parameters are guesses.)

Undecided positions never hold a draft at top-1 probability >= 0.8 (their
entropy floor keeps them under it), so a profile alone never makes a settled
token flip: self-correction stays a planted phenomenon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

PAD_ID = 0  # Gemma's <pad>
NOISE_LOW = 1000  # noise tokens come from [NOISE_LOW, vocab): clear of special and control tokens
_MAX_ENTROPY = 6.0  # nats; geometric q ~0.995, far above any real position's mean (~4)


@dataclass(frozen=True)
class Profile:
    """How a simulated canvas is denoised; see the module docstring for each part."""

    name: str
    description: str
    # lock step of content positions: floor(exp(lock_mu + lock_sigma * z) - lock_shift)
    lock_mu: float
    lock_sigma: float
    lock_shift: float
    order_corr: float  # Gaussian-copula weight of the position in z (0: random order, 1: strictly left to right)
    change_prob: float  # chance per step that an undecided position's draft top-1 is replaced
    approach_steps: int  # steps before its lock step at which the final token is the runner-up (slot 2)
    # where drafts come from (shares; the rest is vocabulary noise)
    draft_own: float  # the position's own final token
    draft_nearby: float  # the final token 1-4 positions away
    draft_frequent: float  # one of the text's most frequent tokens
    # entropy (nats) of undecided positions: floor + (start - floor) * exp(-(step / decay) ** shape)
    undecided_start: float
    undecided_decay: float
    undecided_floor: float
    undecided_shape: float
    locked_entropy: float  # at the lock step (default sampler) or at the lock (hot: until accepted)
    locked_decay: float  # per-step factor once accepted
    entropy_jitter: float  # sigma of the log-normal factor on every entropy
    # acceptance step (hot sampler): max(lock + 1, floor(exp(accept_mu + accept_sigma * e) - accept_shift))
    accept_mu: float | None = None
    accept_sigma: float = 0.0
    accept_shift: float = 0.0
    accepted_entropy: float = 0.05
    accept_early: float = 0.0  # share accepted soon after their lock instead (1 + Exp(accept_early_delay) steps)
    accept_early_delay: float = 2.0
    # answers (only where a request names its answer's positions)
    answer_revise_prob: float = 0.0
    answer_lock_mu: float = 0.0
    answer_lock_sigma: float = 1.0
    answer_lock_shift: float = 0.0
    answer_change_prob: float = 0.5
    answer_draft_entropy: float = 1.2
    # high_entropy: undecided mass pinned to a band of top-1 probability, whatever the step
    undecided_top1: tuple[float, float] | None = None
    # The step count the profile was calibrated at (the captures' T); with fewer steps late
    # locks are clamped to steps - 3, so a hot run needs ~64 to show its whole schedule.
    natural_steps: int = 48


DEFAULT = Profile(
    name="default",
    description="the default sampler (temperature 0.8 -> 0.4, entropy bound 0.1): almost every change in the "
                "first ~10 steps, later steps repeat the canvas",
    lock_mu=1.72, lock_sigma=0.425, lock_shift=1.75, order_corr=0.9,
    change_prob=0.35, approach_steps=3, draft_own=0.07, draft_nearby=0.26, draft_frequent=0.67,
    undecided_start=3.3, undecided_decay=3.0, undecided_floor=0.6, undecided_shape=2.0,
    locked_entropy=0.3, locked_decay=0.2, entropy_jitter=0.2,
    answer_revise_prob=0.4, answer_lock_mu=1.35, answer_lock_sigma=1.0, answer_lock_shift=0.0,
    answer_change_prob=0.4, answer_draft_entropy=1.2,
    natural_steps=48,
)

HOT = Profile(
    name="hot",
    description="the hot sampler (temperature 1.3 -> 0.8, entropy bound 0.3): tens of positions change every "
                "step for ~30 steps, the sampler accepts at steps ~25-40",
    lock_mu=3.6, lock_sigma=0.225, lock_shift=24.0, order_corr=0.8,
    change_prob=0.42, approach_steps=3, draft_own=0.07, draft_nearby=0.26, draft_frequent=0.67,
    undecided_start=3.8, undecided_decay=20.0, undecided_floor=1.3, undecided_shape=1.0,
    locked_entropy=1.0, locked_decay=0.3, entropy_jitter=0.2,
    accept_mu=3.65, accept_sigma=0.17, accept_shift=3.0, accept_early=0.12, accepted_entropy=0.05,
    answer_revise_prob=0.4, answer_lock_mu=2.2, answer_lock_sigma=0.8, answer_lock_shift=2.0,
    answer_change_prob=0.5, answer_draft_entropy=1.5,
    natural_steps=64,
)

# The hot sampler's schedule, locks, drafts and answers; only the undecided positions' entropy differs.
HIGH_ENTROPY = replace(
    HOT,
    name="high_entropy",
    description="the hot sampler's schedule with every undecided position at 2-3 nats (top-1 0.15-0.35, the "
                "next kept tokens 0.1-0.25 each) until it locks: the heaviest realistic top-k mass",
    undecided_start=2.5, undecided_decay=1.0, undecided_floor=2.5, entropy_jitter=0.0,
    undecided_top1=(0.15, 0.35),
)

# The default sampler's dynamics with no token of the text at an undecided position. With the
# text's tokens there, adjacent undecided positions often hold the same token with split mass
# (" the" drafted beside " the", as the real argmax shows; a repeated digit such as the "00" of
# 400 whose final token is the runner-up at both places) and shifted copies of a phrase, so the
# smearing monitors flag some of the corpus's negatives: token_smearing 19 and
# sequence_smearing 12 of 240 with the `default` profile (BENCHMARKS.md, "The simulator
# calibrated to the real model"). The labelled corpus, the demo and scenario() use this variant,
# so that its negatives stay negatives; entropy, mass, changes per step and commit order are
# the default profile's (tests/client/test_simulate_calibration.py checks both).
DEFAULT_NOISE_DRAFTS = replace(
    DEFAULT, name="default_noise_drafts", draft_own=0.0, draft_nearby=0.0, draft_frequent=0.0, approach_steps=0,
    # A draft is never the final token here, so the last change is the planned lock itself, and
    # a redrawn draft always differs (the text's frequent tokens repeat): slightly earlier locks,
    # a looser order and fewer redraws give the same measured statistics as DEFAULT.
    lock_shift=2.0, order_corr=0.8, change_prob=0.29,
    description="the default sampler's dynamics, with no token of the text at an undecided position: drafts "
                "and alternatives come from the vocabulary (no accidental smearing)",
)

PROFILES: dict[str, Profile] = {p.name: p for p in (DEFAULT, HOT, HIGH_ENTROPY, DEFAULT_NOISE_DRAFTS)}


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(f"profile: unknown {profile!r}; expected one of {sorted(PROFILES)}") from None


# ---- geometric top-k mass -----------------------------------------------------------------

def geometric_entropy(q: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of p_i = (1 - q) q^i, i >= 0."""
    q = q.clamp(1e-9, 1 - 1e-9)
    return (-(1 - q) * torch.log1p(-q) - q * torch.log(q)) / (1 - q)


_Q_GRID = torch.linspace(1e-6, 0.995, 4096, dtype=torch.float64)
_H_GRID = geometric_entropy(_Q_GRID)


def geometric_ratio(entropy: torch.Tensor) -> torch.Tensor:
    """The q whose geometric distribution has `entropy` nats (clamped to [0, 6]), by table lookup."""
    h = entropy.to(torch.float64).clamp(0.0, _MAX_ENTROPY)
    index = torch.searchsorted(_H_GRID, h.contiguous()).clamp(1, len(_H_GRID) - 1)
    lo, hi = _H_GRID[index - 1], _H_GRID[index]
    frac = ((h - lo) / (hi - lo)).clamp(0, 1)
    return (_Q_GRID[index - 1] + frac * (_Q_GRID[index] - _Q_GRID[index - 1])).to(torch.float32)


def geometric_topk(q: torch.Tensor, k: int) -> torch.Tensor:
    """The first k probabilities [..., k] of p_i = (1 - q) q^i (most probable first; the rest is the tail)."""
    powers = q.unsqueeze(-1) ** torch.arange(k, dtype=torch.float32)
    return (1 - q).unsqueeze(-1) * powers


def topk_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats estimated from top-k rows [..., k] (sorted, most probable first).

    The kept tokens count as they are; the mass they leave out (1 - sum) is taken
    to continue geometrically from the last kept probability p_k with the ratio
    rho = r / (p_k + r) that makes the tail sum to r. Exact for a geometric
    distribution; for a real one it lies between the lowest entropy consistent
    with the top-k and the highest (the tail spread over the whole vocabulary).
    """
    p = probs.to(torch.float64).clamp_min(0)
    kept = torch.where(p > 0, -p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p)).sum(-1)
    last = p[..., -1].clamp_min(1e-12)
    rest = (1 - p.sum(-1)).clamp(0, 1)
    rho = (rest / (last + rest)).clamp(1e-12, 1 - 1e-9)
    tail = -rest * torch.log(last) - torch.log(rho) * last * rho / (1 - rho) ** 2
    return (kept + torch.where(rest > 1e-9, tail, torch.zeros_like(tail))).to(torch.float32)


# ---- one canvas's dynamics ----------------------------------------------------------------

@dataclass(frozen=True)
class Dynamics:
    """A canvas's planned dynamics (lock steps already moved by any phenomenon): what simulate() builds on."""

    lock: torch.Tensor  # [L] long: first step whose top-1 is the final token for good
    accept: torch.Tensor  # [L] long: first step the sampler accepts the position (== lock unless hot)
    top1: torch.Tensor  # [S, L] long: drafts before the lock step, the final token from it
    entropy: torch.Tensor  # [S, L] float: nats


def _lognormal_steps(z: torch.Tensor, mu: float, sigma: float, shift: float) -> torch.Tensor:
    return torch.floor(torch.exp(mu + sigma * z) - shift).clamp_min(0).long()


def plan_locks(profile: Profile, content: torch.Tensor, steps: int, gen: torch.Generator,
               answer: torch.Tensor | None = None) -> torch.Tensor:
    """Lock steps [L] of one canvas: content positions by the profile's copula, padding at step 0.

    `answer` [L] bool marks the answer's positions: written first (step 0), or with
    probability answer_revise_prob revised and locked later. Every lock is at most
    steps - 3, so the final token holds for the last three steps.
    """
    length = content.shape[0]
    count = int(content.sum())
    lock = torch.zeros(length, dtype=torch.long)
    if count:
        rank = (torch.cumsum(content.long(), 0) - 1).clamp_min(0).to(torch.float64)
        quantile = ((rank + 0.5) / count).clamp(1e-6, 1 - 1e-6)
        a = profile.order_corr
        z = (a * torch.special.ndtri(quantile).float()
             + math.sqrt(max(0.0, 1 - a * a)) * torch.randn(length, generator=gen))
        lock = torch.where(content, _lognormal_steps(z, profile.lock_mu, profile.lock_sigma, profile.lock_shift), lock)
    if answer is not None and bool(answer.any()):
        revised = torch.rand(length, generator=gen) < profile.answer_revise_prob
        late = _lognormal_steps(torch.randn(length, generator=gen), profile.answer_lock_mu,
                                profile.answer_lock_sigma, profile.answer_lock_shift).clamp_min(1)
        # One answer, one fate: every position of the span is revised or none is.
        revised = revised[answer.nonzero()[0, 0]].expand(length)
        lock = torch.where(answer, torch.where(revised, late, torch.zeros_like(lock)), lock)
    return lock.clamp(0, max(0, steps - 3))


def plan_dynamics(profile: Profile, target: torch.Tensor, content: torch.Tensor, lock: torch.Tensor,
                  steps: int, vocab_size: int, gen: torch.Generator,
                  answer: torch.Tensor | None = None) -> Dynamics:
    """Acceptance steps, draft top-1 tokens and entropies of one canvas ([L] target, content mask, lock steps)."""
    length = target.shape[0]
    accept = lock.clone()
    if profile.accept_mu is not None:
        drawn = _lognormal_steps(torch.randn(length, generator=gen), profile.accept_mu, profile.accept_sigma,
                                 profile.accept_shift).clamp(max=max(0, steps - 2))
        wait = -torch.log(torch.rand(length, generator=gen).clamp_min(1e-12)) * profile.accept_early_delay
        delay = 1 + wait.long()
        early = torch.rand(length, generator=gen) < profile.accept_early
        drawn = torch.where(early, lock + delay, drawn)
        accept = torch.where(content, torch.maximum(lock + 1, drawn), torch.maximum(lock, drawn))
        accept = torch.minimum(accept, torch.full_like(accept, max(0, steps - 2)))
    change_prob = torch.full((length,), profile.change_prob)
    if answer is not None:
        change_prob = torch.where(answer, profile.answer_change_prob, change_prob)
    top1 = _drafts(profile, target, content, steps, vocab_size, gen, change_prob, answer)
    top1 = torch.where(torch.arange(steps).unsqueeze(1) >= lock, target, top1)
    entropy = _entropy(profile, lock, accept, steps, gen, answer)
    return Dynamics(lock=lock, accept=accept, top1=top1, entropy=entropy)


def _drafts(profile: Profile, target: torch.Tensor, content: torch.Tensor, steps: int, vocab_size: int,
            gen: torch.Generator, change_prob: torch.Tensor, answer: torch.Tensor | None) -> torch.Tensor:
    """[S, L] draft top-1 tokens: a new draft with probability change_prob a step, drawn from the profile's sources."""
    length = target.shape[0]
    count = int(content.sum())
    # candidate table: one draft per (segment, position); segment j is the draft after j replacements
    noise = torch.randint(NOISE_LOW, vocab_size, (steps, length), generator=gen)
    if count == 0:
        return torch.full((steps, length), PAD_ID, dtype=torch.long)
    text = target[content]  # content is a prefix of the canvas: blocks fill left to right
    distance = torch.randint(1, 5, (steps, length), generator=gen)
    offset = distance * (torch.randint(0, 2, (steps, length), generator=gen) * 2 - 1)
    nearby = text[(torch.arange(length) + offset).clamp(0, count - 1)]
    values, counts = torch.unique(text, return_counts=True)
    common = torch.argsort(counts, descending=True, stable=True)[:3]
    frequent_ids, weights = values[common], counts[common].float()
    drawn = torch.multinomial(weights, steps * length, replacement=True, generator=gen)
    frequent = frequent_ids[drawn].view(steps, length)
    own = target.expand(steps, length)
    pick = torch.rand(steps, length, generator=gen)
    shares = torch.tensor([profile.draft_own, profile.draft_nearby, profile.draft_frequent]).cumsum(0)
    table = torch.where(pick < shares[0], own, torch.where(pick < shares[1], nearby,
                                                            torch.where(pick < shares[2], frequent, noise)))
    if answer is not None:
        # An answer's drafts are other answers, never filler: text tokens from elsewhere, or noise.
        elsewhere = text[torch.randint(0, count, (steps, length), generator=gen)]
        table = torch.where(answer, torch.where(pick < 0.5, elsewhere, noise), table)
    change = torch.rand(steps, length, generator=gen) < change_prob
    change[0] = True
    segment = torch.cumsum(change.long(), 0) - 1
    drafts = torch.gather(table, 0, segment)
    return torch.where(content, drafts, torch.full_like(drafts, PAD_ID))


def _entropy(profile: Profile, lock: torch.Tensor, accept: torch.Tensor, steps: int, gen: torch.Generator,
             answer: torch.Tensor | None) -> torch.Tensor:
    length = lock.shape[0]
    step = torch.arange(steps, dtype=torch.float32).unsqueeze(1).expand(steps, length)
    undecided = profile.undecided_floor + (profile.undecided_start - profile.undecided_floor) * torch.exp(
        -(step / profile.undecided_decay) ** profile.undecided_shape)
    if answer is not None:
        undecided = torch.where(answer, torch.full_like(undecided, profile.answer_draft_entropy), undecided)
    since_accept = (step - accept.float()).clamp_min(0)
    settled = profile.accepted_entropy if profile.accept_mu is not None else profile.locked_entropy
    accepted = settled * profile.locked_decay ** since_accept
    if profile.accept_mu is not None:
        # Locked but not yet accepted: from locked_entropy down to accepted_entropy, log-linear
        # in the square of the progress, so it stays uncertain most of the way and falls just
        # before the sampler accepts (its bound is shared: acceptance comes in a burst).
        span = (accept - lock).clamp_min(1).float()
        progress = ((step - lock.float()) / span).clamp(0, 1) ** 2
        ramp = torch.exp(math.log(profile.locked_entropy)
                         + (math.log(profile.accepted_entropy) - math.log(profile.locked_entropy)) * progress)
        locked = torch.where(step < accept.float(), ramp, accepted)
    else:
        locked = accepted
    entropy = torch.where(step < lock.float(), undecided, locked)
    if profile.entropy_jitter > 0:
        entropy = entropy * torch.exp(profile.entropy_jitter * torch.randn(steps, length, generator=gen))
    # An undecided draft stays under the monitors' settle probability: a geometric top-1 of 0.8
    # is 0.63 nats, 0.75 nats keeps it at <= ~0.75.
    return torch.where(step < lock.float(), entropy.clamp_min(0.75), entropy).clamp(1e-4, _MAX_ENTROPY)


def mass(profile: Profile, dynamics: Dynamics, k: int, gen: torch.Generator) -> torch.Tensor:
    """[S, L, k] kept probabilities (slot 0 = top-1) from the planned entropies."""
    q = geometric_ratio(dynamics.entropy)
    if profile.undecided_top1 is not None:
        low, high = profile.undecided_top1
        steps, length = dynamics.entropy.shape
        undecided = torch.arange(steps).unsqueeze(1) < dynamics.lock
        top1 = low + (high - low) * torch.rand(steps, length, generator=gen)
        q = torch.where(undecided, 1 - top1, q)
    return geometric_topk(q, k)
