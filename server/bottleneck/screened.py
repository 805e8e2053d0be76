"""Exact top-k on a CPU: screen the vocabulary with 8-bit scores whose error is provably bounded.

The brute force computes all V logits in float32 (~0.9-1.1 s for a
256-position step against Gemma's 262,144 x 640 matrix on the 2-core
development machine). This path computes them in int8 (an integer GEMM with
VNNI, ~6x cheaper there), bounds each one's error, and rescores exactly only
the tokens the bound cannot exclude (~40 a position on Gemma's own hidden
states). Measured end to end in BENCHMARKS.md.

Index, built once from the embedding matrix E [V, d]:
  1. centre: Ec = E - mu (mu the mean row). Every score of a query h shifts
     by the same h.mu, so rankings do not change;
  2. rotate: Er = Ec R with a fixed random orthogonal R, so h.e = (hR).(eR).
     Hidden states carry a few coordinates ~10x larger than the rest
     ("massive activations"); quantised as they come, those set the scale and
     the rounding error of every other coordinate. The rotation spreads them
     over all d coordinates (the QuaRot trick): on Gemma 3 270M's own hidden
     states it cuts the tokens the bound cannot exclude from ~1,500 to ~40 a
     position;
  3. quantise with one scale s for the whole matrix: Er = s q + r, q int8.
     One scale keeps each query's ranking in the integers, so the screen
     never converts [L, V] scores to floats. Kept per row: ||r|| (plus the
     float32 rounding of steps 1-2, bounded by gamma_d = d u / (1 - d u)).

Query H [L, d]: h' = hR (float64), quantised per row h' = t p + w, p int8.
A = p q^T is exact in int32 (|A| <= d 127^2 < 2^31), approx = t s A, and
    |h.(e - mu) - t s A| <= ||h'|| eps_v + ||w|| ||s q_v||  = Delta
(Cauchy-Schwarz on the two rounding residuals). With eps = max_v eps_v and
the same for ||s q_v||, Delta is one number per position while scanning: a
token whose A_v < A_kth - 2 Delta / (t s) scores below each of the k tokens
with the largest A, so it is not in the top k. The few left are judged with
their own eps_v and ||s q_v||, then scored in float32 with its rounding bound
(gamma_d ||h|| ||e||), and what is still undecided in float64 from E as
stored, so the top-k ids and logits are those of a float64 brute force (ties:
the smaller id first).

The vocabulary is streamed in chunks (bounded memory); a running lower bound
on each position's k-th largest A (from the first chunk's top-k and every
chunk's maximum) filters each chunk as it is computed.

Normalisation (optional, `with_log_z`): logsumexp over V of the int8
logits, with the candidates' terms replaced by their float32 ones. The rest's
share stays approximate: the returned `log_z_error` bounds |log Z - estimate|
(small when the candidates hold most of the mass, tenths of a nat for flat
distributions; the measured error is far below the bound), so probabilities
and the residual mass come with a reported error (Bottleneck.residual_error)
instead of the full float32 pass an exact normalisation would cost.
"""

from __future__ import annotations

import dataclasses

import torch

from canvaswatch.server.bottleneck.contract import Candidates
from canvaswatch.server.bottleneck.projection import Projection, project_topk_chunked

_U32 = 2.0**-24  # unit roundoff of float32
_BLOCK = 64  # columns per block maximum in the chunk filter
# Candidates per position past which the screen has failed to screen (ordinary rows: 10-20 a position)
MAX_CANDIDATES_PER_POSITION = 4096


class ScreenedIndex:
    """The int8 screen of one embedding matrix; query it with topk()."""

    def __init__(self, embeddings: torch.Tensor, *, seed: int = 0, chunk: int | None = None) -> None:
        if embeddings.dim() != 2 or embeddings.device.type != "cpu":
            raise ValueError(f"the int8 screen needs a [V, d] matrix on the CPU, got {list(embeddings.shape)} "
                             f"on {embeddings.device}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.embeddings = embeddings  # as stored: exact rescoring reads these rows
        self.chunk = chunk  # None: sized per query so that one chunk's [L, C] int32 scores stay in cache
        vocab_size, d = embeddings.shape
        build_chunk = 8192
        _check_integer_gemm()  # before the seconds of building, so a machine that cannot fails at once
        self.mean = _mean_row(embeddings)
        generator = torch.Generator().manual_seed(seed)
        self.rotation = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0]
        rotation32 = self.rotation.float()
        gamma = d * _U32 / (1 - d * _U32)
        # One scale for the whole matrix needs its largest rotated coordinate before any row is
        # quantised: two rotating passes keep memory at one chunk, not a rotated copy of E (670 MB).
        self.row_norm = torch.empty(vocab_size, dtype=torch.float64)  # ||E_v||, for float32 bounds
        rotated_max = 0.0
        for start in range(0, vocab_size, build_chunk):
            rows = self.embeddings[start : start + build_chunk].double()
            self.row_norm[start : start + build_chunk] = rows.norm(dim=1)
            rotated_max = max(rotated_max, float(self._rotate(rows, rotation32).abs().max()))
        self.scale = max(rotated_max, 1e-30) / 127.0
        self.codes = torch.empty(vocab_size, d, dtype=torch.int8)
        self.row_error = torch.empty(vocab_size, dtype=torch.float64)  # eps_v
        self.row_code_norm = torch.empty(vocab_size, dtype=torch.float64)  # ||s q_v||
        for start in range(0, vocab_size, build_chunk):
            stop = start + build_chunk
            rotated = self._rotate(self.embeddings[start:stop].double(), rotation32)
            codes = torch.round(rotated / self.scale).clamp_(-127, 127)
            self.codes[start:stop] = codes.to(torch.int8)
            rounding = (rotated.double() - codes.double() * self.scale).norm(dim=1)
            # rotated holds fl((E - mu) R): each coordinate is within gamma_d ||E_v - mu|| of the exact
            # product (|R columns| = 1), and the centring rounds once more (u ||E_v - mu||).
            centred_norm = rotated.double().norm(dim=1) * (1 + 2 * gamma)
            self.row_error[start:stop] = rounding + (gamma * d**0.5 + 2 * _U32) * centred_norm
            self.row_code_norm[start:stop] = (codes.double() * self.scale).norm(dim=1)
        self.row_error *= 1 + 1e-9
        self.row_code_norm *= 1 + 1e-9
        self.error_max = float(self.row_error.max())
        self.code_norm_max = float(self.row_code_norm.max())

    @property
    def vocab_size(self) -> int:
        return int(self.codes.shape[0])

    def _rotate(self, rows: torch.Tensor, rotation32: torch.Tensor) -> torch.Tensor:
        """fl32((rows - mean) R) for float64 rows of E."""
        return (rows - self.mean).float() @ rotation32

    def topk(self, hidden: torch.Tensor, k: int, projection: Projection = Projection(), *,
             with_log_z: bool = True) -> Candidates:
        """Exact top-k logits of softcap(scale * H E^T) for H [L, d] (projection.scale must be > 0).

        values: float64, as a float64 brute force gives them; ids int64; log_z an estimate with
        its error bound (both None without `with_log_z`); rescored: per position, the tokens the
        int8 bound could not exclude (scored in float32).
        """
        if projection.scale <= 0:
            raise ValueError("the screen needs a positive logit scale (a negative one reverses the ranking)")
        h = hidden.double()
        k = min(k, self.vocab_size)
        chunk = max(k, self.chunk or max(1024, min(16384, 2**23 // max(1, h.shape[0]))))
        rotated = h @ self.rotation
        t = rotated.abs().amax(dim=1).clamp_min(1e-300) / 127.0
        p = torch.round(rotated / t[:, None]).clamp_(-127, 127)
        w_norm = (rotated - p * t[:, None]).norm(dim=1)
        h_norm = rotated.norm(dim=1) * (1 + 1e-12) + 1e-300
        delta = h_norm * self.error_max + w_norm * self.code_norm_max  # score units, per position
        unit = t * self.scale  # score per unit of A, per position
        delta_int = delta / unit * (1 + 1e-9) + 1.0  # in units of A, rounded outwards
        p8 = p.to(torch.int8)
        offset = h @ self.mean  # the shift centring removed, needed for absolute logits

        best_maxima = None
        pieces_rows, pieces_ids, pieces_a = [], [], []
        chunk_log_z = []
        candidates, most = 0, MAX_CANDIDATES_PER_POSITION * h.shape[0]
        for start in range(0, self.vocab_size, chunk):
            scores = torch._int_mm(p8, self.codes[start : start + chunk].T)  # [L, C] int32, exact
            blocked = scores.shape[1] % _BLOCK == 0
            if blocked:
                block_max = scores.view(scores.shape[0], -1, _BLOCK).amax(dim=2)  # [L, C / 64]
                maxima = block_max.amax(dim=1).long()
            else:
                maxima = scores.amax(dim=1).long()
            if best_maxima is None:
                # k distinct tokens' scores: their k-th is a lower bound on the vocabulary's k-th
                # (block maxima are k distinct tokens too, and 64x fewer values to select from)
                firsts = block_max if blocked and block_max.shape[1] >= k else scores
                kth = torch.topk(firsts, k, dim=1).values[:, -1].long()
                best_maxima = maxima[:, None]
            else:
                best_maxima = torch.cat([best_maxima, maxima[:, None]], dim=1)
                if best_maxima.shape[1] > k:
                    best_maxima = torch.topk(best_maxima, k, dim=1).values
            if best_maxima.shape[1] == k:
                kth = torch.maximum(kth, best_maxima.min(dim=1).values)
            threshold = (kth - torch.floor(2 * delta_int).long()).clamp(-(2**31), 2**31 - 1).to(torch.int32)
            rows, cols, values = _above(scores, block_max if blocked else None, threshold)
            candidates += len(rows)
            if candidates > most:
                # The screen excludes (almost) nothing: rows whose logits (nearly) all tie, e.g. an all-zero
                # hidden state. Rescoring every candidate would gather [candidates, d] matrices (hundreds of
                # GB for a 256-position step over Gemma's vocabulary): the exact chunked path instead.
                exact = project_topk_chunked(hidden, self.embeddings, k, projection)
                return dataclasses.replace(exact, values=exact.values.double(),
                                           log_z=exact.log_z if with_log_z else None,
                                           rescored=torch.full((h.shape[0],), self.vocab_size, dtype=torch.long))
            pieces_rows.append(rows)
            pieces_ids.append(cols + start)
            pieces_a.append(values)
            if with_log_z:
                chunk_log_z.append(_chunk_log_z(scores, maxima, unit, offset, projection))

        rows, ids, a = torch.cat(pieces_rows), torch.cat(pieces_ids), torch.cat(pieces_a)
        # The scan used one bound per position (the worst row of E); on the few candidates, each
        # token's own bound: keep those whose upper bound reaches a lower bound on the k-th score.
        approx_score = unit[rows] * a.double()  # centred: h.(E_v - mu) up to token_delta
        token_delta = h_norm[rows] * self.row_error[ids] + w_norm[rows] * self.row_code_norm[ids]
        # A lower bound on each position's k-th score: at least k candidates have A >= kth (a lower
        # bound on the k-th largest A; a few more than k per position); the k-th largest of their
        # scores' lower bounds is below k scores.
        leaders = a >= kth[rows]
        lead_rows = rows[leaders]
        lead_scores, lead_bound = self._score_in_float32(hidden, lead_rows, ids[leaders])
        floor = _kth_largest(lead_scores - lead_bound, lead_rows, k, h.shape[0])
        keep = approx_score + token_delta >= floor[rows] - offset[rows]
        rows, ids, approx_score = rows[keep], ids[keep], approx_score[keep]
        rescored = torch.bincount(rows, minlength=h.shape[0])
        scored, bound = self._score_in_float32(hidden, rows, ids)
        narrow = _above_kth_lower(scored, bound, rows, k, h.shape[0])
        exact = projection.apply(_dot_rows(h, self.embeddings, rows[narrow], ids[narrow]))
        values, top_ids = _top_exact(exact, ids[narrow], rows[narrow], k, h.shape[0])
        if not with_log_z:
            return Candidates(values, top_ids, None, None, rescored=rescored)
        approx = projection.apply(offset[rows] + approx_score)
        # The candidates' terms from their float32 scores (softcap is 1-Lipschitz, so the bound scales
        # with the logit scale only); + 1e-4: the float32 rounding of approximate logits in chunk sums.
        log_z, error = _combine_log_z(torch.stack(chunk_log_z, dim=1), approx, projection.apply(scored),
                                      projection.scale * bound, rows, projection.scale * delta + 1e-4,
                                      h.shape[0], chunk)
        return Candidates(values, top_ids, log_z, error, rescored=rescored)


    def _score_in_float32(self, hidden: torch.Tensor, rows: torch.Tensor,
                          ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate scores h.E_v computed in float32, each with a bound on its error.

        The stored matrix and a float32/16/bf16 state are exact in float32, so fl32(h.e) is within
        gamma_d |h|.|e| <= gamma_d ||h|| ||e|| of h.e (a float64 state is rounded first: u ||h|| ||e||
        more).
        """
        h32 = hidden.float()
        d = h32.shape[1]
        gathered = self.embeddings.index_select(0, ids).float()
        scores = torch.bmm(gathered[:, None, :], h32.index_select(0, rows)[:, :, None]).reshape(-1).double()
        gamma = d * _U32 / (1 - d * _U32) + (_U32 if hidden.dtype == torch.float64 else 0.0)
        h_norm = hidden.double().norm(dim=1)
        bound = gamma * h_norm[rows] * self.row_norm[ids] * (1 + 1e-6) + 1e-30
        return scores, bound


def _kth_largest(values: torch.Tensor, rows: torch.Tensor, k: int, length: int) -> torch.Tensor:
    """Each row's k-th largest value (rows given per value; every row has at least k)."""
    return values[_first_k(_order_by_row(values, rows), rows, k, length)].reshape(-1, k).amin(dim=1)


def _above_kth_lower(scores: torch.Tensor, bound: torch.Tensor, rows: torch.Tensor, k: int,
                     length: int) -> torch.Tensor:
    """Mask of the candidates whose upper bound reaches their row's k-th largest lower bound."""
    return scores + bound >= _kth_largest(scores - bound, rows, k, length)[rows]


def _above(scores: torch.Tensor, block_max: torch.Tensor | None,
           threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, column, score) of every score >= its row's threshold.

    With block maxima, only the 64-wide blocks whose maximum reaches the threshold are
    compared: a few per row, instead of a compare-and-scan of the whole [L, C] chunk.
    """
    if block_max is None:
        rows, cols = torch.nonzero(scores >= threshold[:, None], as_tuple=True)
        return rows, cols, scores[rows, cols].long()
    block_rows, block_cols = torch.nonzero(block_max >= threshold[:, None], as_tuple=True)
    blocks = scores.view(scores.shape[0], -1, _BLOCK)[block_rows, block_cols]  # [n, 64]
    hit, offset = torch.nonzero(blocks >= threshold[block_rows][:, None], as_tuple=True)
    return block_rows[hit], block_cols[hit] * _BLOCK + offset, blocks[hit, offset].long()


def _mean_row(embeddings: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    total = torch.zeros(embeddings.shape[1], dtype=torch.float64)
    for start in range(0, embeddings.shape[0], chunk):
        total += embeddings[start : start + chunk].double().sum(dim=0)
    return total / embeddings.shape[0]


def _check_integer_gemm() -> None:
    """The bound assumes exact int32 accumulation: check this torch's int8 GEMM on extreme values."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 640), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (640, 64), generator=generator, dtype=torch.int8)
    a[0], b[:, 0] = 127, 127  # the largest sum: 640 * 127^2
    a[1], b[:, 1] = -127, 127
    if not torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()):
        raise RuntimeError("torch._int_mm is not exact on this machine; the int8 screen cannot be used")


def _order_by_row(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Indices sorting the candidates by row, each row's values descending."""
    order = torch.argsort(values, descending=True, stable=True)
    return order[torch.argsort(rows[order], stable=True)]


def _first_k(order: torch.Tensor, rows: torch.Tensor, k: int, length: int) -> torch.Tensor:
    """The first k entries of each row in `order` (row-major result, [length * k])."""
    counts = torch.bincount(rows, minlength=length)
    if bool((counts < k).any()):
        raise RuntimeError("int8 screen lost candidates (a bug: fewer than k for a position)")
    starts = torch.cumsum(counts, 0) - counts
    return order[(starts[:, None] + torch.arange(k)).reshape(-1)]


def _dot_rows(h: torch.Tensor, embeddings: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """h[rows[i]] . E[ids[i]] in float64 (exact products of the stored values, one rounding per add)."""
    gathered = embeddings.index_select(0, ids).double()
    return torch.bmm(gathered[:, None, :], h.index_select(0, rows)[:, :, None]).reshape(-1)


def _top_exact(exact: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, k: int,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k largest exact logits, ties to the smaller id (sorted descending)."""
    order = torch.argsort(ids, stable=True)
    order = order[torch.argsort(exact[order], descending=True, stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    pick = _first_k(order, rows, k, length)
    return exact[pick].reshape(length, k), ids[pick].reshape(length, k)


def _chunk_log_z(scores: torch.Tensor, maxima: torch.Tensor, unit: torch.Tensor, offset: torch.Tensor,
                 projection: Projection) -> torch.Tensor:
    """log of the chunk's sum of exp(approximate logit), per row (float32 terms, float64 result)."""
    peak = projection.apply(offset + unit * maxima.double())
    if projection.softcap > 0:
        logits = projection.apply(offset.float()[:, None] + unit.float()[:, None] * scores.float())
        terms = torch.exp(logits - peak.float()[:, None])
    else:
        # exp(scale * unit * (A - max)): the subtraction is exact in the integers
        terms = torch.exp((scores - maxima.to(torch.int32)[:, None]).float() * (projection.scale * unit).float()[:, None])
    return peak + torch.log(terms.sum(dim=1).double())


def _combine_log_z(chunk_log_z: torch.Tensor, approx: torch.Tensor, better: torch.Tensor, better_error: torch.Tensor,
                   rows: torch.Tensor, delta: torch.Tensor, length: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate and error bound of log Z: candidates from their accurate logits, the rest from the int8 ones."""
    shift = torch.logsumexp(chunk_log_z, dim=1)
    total_approx = torch.exp(chunk_log_z - shift[:, None]).sum(dim=1)  # Z_approx / e^shift

    def per_row(terms: torch.Tensor) -> torch.Tensor:
        return torch.zeros(length, dtype=torch.float64).index_add_(0, rows, torch.exp(terms - shift[rows]))

    candidate_approx = per_row(approx)
    candidate, candidate_upper, candidate_lower = (per_row(better), per_row(better + better_error),
                                                   per_row(better - better_error))
    # float32 terms summed in float32: each chunk sum is within (C + 4) u of its value
    slack = (chunk + 4) * _U32 * total_approx
    rest = (total_approx - candidate_approx).clamp_min(0.0)
    estimate = candidate + rest
    upper = candidate_upper + (rest + slack) * torch.exp(delta)
    lower = candidate_lower + (rest - slack).clamp_min(0.0) * torch.exp(-delta)
    error = torch.maximum(torch.log(upper / estimate), torch.log(estimate / lower))
    return shift + torch.log(estimate), error
