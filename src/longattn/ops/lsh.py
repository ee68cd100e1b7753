"""LSH attention (Reformer; Kitaev, Kaiser & Levskaya 2020, "Reformer: The Efficient Transformer").

Shared-QK attention: the keys are the unit-normalised queries, k_j = q_j / |q_j|,
so the ``k`` argument is **ignored** (its gradient is None); this is what makes one
hash serve queries and keys alike (paper section 2). Per round r of ``n_hashes``:

1. hash: h_r(x) = argmax([x R_r, -x R_r]) with a random Gaussian R_r [D, n_buckets/2]
   (angular LSH, Andoni et al. 2015), shared by batch and heads;
2. sort tokens by (bucket, position), cut the order into chunks of ``bucket_size``;
3. each chunk attends to itself and to the chunk before it (chunk 0 has none; no
   wrap-around), by its full query-key products;
4. a token never attends to itself unless nothing else is visible in any round
   (then its output is its own value).

The rounds are merged by their log-sum-exp weights, out = sum_r softmax_r(lse_r) out_r.
With ``dedup=True`` (the paper's correction, section 2.2) a pair seen in n rounds has
its score lowered by log n in each, so the merge is *exactly* softmax attention over
the union of the rounds' key sets; ``dedup=False`` counts duplicates several times
(reformer-pytorch's default) and is a little cheaper.

Causal (strictly): query i sees, in each round, the keys j < i of its own bucket
among its ``bucket_size`` most recent same-bucket predecessors. Plain chunks would
let future tokens move chunk boundaries (a leak); this window depends on tokens <= i
only. Padded keys (``key_padding_mask``) are sorted after all real tokens and never
seen. Lengths need not be multiples of ``bucket_size``.

Cost per head: O(n_hashes * N * bucket_size * D) time, O(n_hashes * N * bucket_size)
memory, plus O(n_hashes * N * n_buckets) for hashing. Never an N x N tensor.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from longattn.ops._checks import check_int, check_qkv, default_scale
from longattn.ops._chunked import ceil_div, sorted_chunk_attention, unit
from longattn.ops._softmax import pad_head_dim, work_dtype
from longattn.registry import Param, register


#: elements (B * heads * N * max(D, Dv)) of one head group (see :func:`by_head_groups`)
HEAD_GROUP_ELEMENTS = 1 << 20


def by_head_groups(fn, B: int, H: int, N: int, width: int) -> Tensor:
    """``fn(h0, h1)`` -> [B, h1 - h0, ...] for groups of heads, concatenated on dim 1.

    Groups hold about :data:`HEAD_GROUP_ELEMENTS` elements per [B, heads, N, width]
    tensor. With more than one group and gradients enabled each group runs under
    non-reentrant activation checkpointing: its intermediates are recomputed in the
    backward, so the peak memory is one group's working set (not H heads' saved
    tensors), at the cost of a second forward. Heads are independent in every
    mechanism that uses this, so the result equals ``fn(0, H)``.
    """
    per = max(1, min(H, HEAD_GROUP_ELEMENTS // max(1, B * N * width)))
    if per >= H:
        return fn(0, H)
    outs = []
    for h0 in range(0, H, per):
        h1 = min(H, h0 + per)
        if torch.is_grad_enabled():
            outs.append(torch.utils.checkpoint.checkpoint(fn, h0, h1, use_reentrant=False))
        else:
            outs.append(fn(h0, h1))
    return torch.cat(outs, dim=1)


#: kept for callers of the old name: see :func:`longattn.ops._softmax.pad_head_dim`
common_head_size = pad_head_dim


def resolve_n_buckets(N: int, bucket_size: int, n_buckets: int | None) -> int:
    """The number of buckets: given, or about N / bucket_size (rounded up to even)."""
    check_int("bucket_size", bucket_size, minimum=1)
    if n_buckets is None:
        n = ceil_div(N, bucket_size)
        return n if n == 1 else n + (n % 2)
    check_int("n_buckets", n_buckets, minimum=1)
    if n_buckets > 1 and n_buckets % 2:
        raise ValueError(
            f"n_buckets must be 1 or even (hashing takes argmax over [xR, -xR]), got {n_buckets}"
        )
    return n_buckets


def random_rotations(
    n_hashes: int, dim: int, n_buckets: int, seed: int | None,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gaussian rotations [n_hashes, dim, max(1, n_buckets // 2)], reproducible from ``seed``.

    ``seed=None`` draws from torch's global generator.
    """
    shape = (n_hashes, dim, max(1, n_buckets // 2))
    if seed is None:
        r = torch.randn(shape)
    else:
        g = torch.Generator().manual_seed(int(seed))
        r = torch.randn(shape, generator=g)
    return r.to(device=device, dtype=dtype)


#: rows hashed per block: the block's projections (rows x n_buckets/2) stay in cache
_HASH_ROWS = 2048


@torch.no_grad()
def lsh_buckets(x: Tensor, rotations: Tensor, n_buckets: int) -> Tensor:
    """Angular LSH: x [B, H, N, D], rotations [R, D, n_buckets/2] -> int64 [B, H, R, N].

    h(x) = argmax([x R, -x R]): the largest projection if it outweighs the most
    negative one, else the most negative one's index + n_buckets / 2. Computed a block
    of rows at a time (no N x n_buckets/2 projection tensor)."""
    B, H, N, D = x.shape
    R = rotations.shape[0]
    if n_buckets == 1:
        return torch.zeros(B, H, R, N, dtype=torch.long, device=x.device)
    half = n_buckets // 2
    rows = x.reshape(B * H * N, D)
    out = torch.empty(R, B * H * N, dtype=torch.long, device=x.device)
    rot = rotations.to(x.dtype)
    proj = x.new_empty(min(_HASH_ROWS, rows.shape[0]), half)
    for r in range(R):
        for s in range(0, rows.shape[0], _HASH_ROWS):
            blk = rows[s : s + _HASH_ROWS]
            p = torch.mm(blk, rot[r], out=proj[: blk.shape[0]])
            hi, ihi = p.max(-1)
            lo, ilo = p.min(-1)
            out[r, s : s + blk.shape[0]] = torch.where(hi >= -lo, ihi, ilo + half)
    return out.view(R, B, H, N).permute(1, 2, 0, 3).contiguous()


def _check_rotations(rotations: Tensor, n_hashes: int, D: int, n_buckets: int) -> None:
    want = (n_hashes, D, max(1, n_buckets // 2))
    if not isinstance(rotations, Tensor):
        raise TypeError(f"rotations must be a Tensor {list(want)}, got {type(rotations).__name__}")
    if tuple(rotations.shape) != want:
        raise ValueError(
            f"rotations must have shape [n_hashes, D, n_buckets // 2] = {list(want)}, "
            f"got {tuple(rotations.shape)}"
        )


class LSHAttention(nn.Module):
    """Module form of :func:`lsh_attention`; owns the seed of the hash rotations.

    In training the rotations are redrawn at every call (from ``seed`` and a call
    counter kept in the state dict, so a run is reproducible); in eval, or with
    ``redraw=False``, every call uses the rotations drawn from ``seed``.
    ``rotations`` (a fixed tensor [n_hashes, D, n_buckets // 2]) overrides both.
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        bucket_size: int = 64,
        n_buckets: int | None = None,
        n_hashes: int = 2,
        seed: int | None = 0,
        rotations: Tensor | None = None,
        dedup: bool = True,
        redraw: bool = True,
    ) -> None:
        super().__init__()
        check_int("bucket_size", bucket_size, minimum=1)
        check_int("n_hashes", n_hashes, minimum=1)
        if n_buckets is not None:
            resolve_n_buckets(1, bucket_size, n_buckets)
        self.heads, self.head_dim = heads, head_dim
        self.bucket_size, self.n_buckets, self.n_hashes = bucket_size, n_buckets, n_hashes
        self.seed = 0 if seed is None else int(seed)
        self.dedup, self.redraw = dedup, redraw
        self.register_buffer("rotations", rotations, persistent=rotations is not None)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
        key_padding_mask: Tensor | None = None, scale: float | None = None,
    ) -> Tensor:
        seed = self.seed
        if self.training and self.redraw and self.rotations is None:
            seed = self.seed + 1_000_003 * int(self.calls.item())
            self.calls += 1
        return lsh_attention(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
            bucket_size=self.bucket_size, n_buckets=self.n_buckets, n_hashes=self.n_hashes,
            seed=seed, rotations=self.rotations, dedup=self.dedup,
        )

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, bucket_size={self.bucket_size}, "
                f"n_buckets={self.n_buckets}, n_hashes={self.n_hashes}, seed={self.seed}")


@register(
    "lsh",
    params=(
        Param("bucket_size", 64, "chunk length of the sorted order (keys per chunk)"),
        Param("n_buckets", None, "hash buckets (1 or even); default ~N / bucket_size"),
        Param("n_hashes", 2, "hashing rounds, merged by their log-sum-exp"),
        Param("seed", 0, "seed of the random rotations (None: torch's global RNG)"),
        Param("rotations", None, "fixed rotations [n_hashes, D, n_buckets // 2] (overrides seed)"),
        Param("dedup", True, "count a key seen in several rounds once (paper's correction)"),
    ),
    family="lsh",
    exact=False,
    causal=True,
    learned=False,
    cross=False,
    subquadratic=True,
    paper="Kitaev, Kaiser & Levskaya 2020, Reformer: The Efficient Transformer",
    summary="shared-QK angular-LSH buckets, sorted chunks + one look-back, n_hashes rounds",
    module=LSHAttention,
)
def lsh_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
    scale: float | None = None, bucket_size: int = 64, n_buckets: int | None = None, n_hashes: int = 2,
    seed: int | None = 0, rotations: Tensor | None = None, dedup: bool = True,
) -> Tensor:
    """Reformer LSH attention. q [B,H,N,D], v [B,H,N,Dv] -> [B,H,N,Dv]; ``k`` is ignored.

    Keys are q / |q| (shared QK); see the module docstring for the exact semantics.
    """
    d = check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cross=False)
    s = default_scale(scale, d.D)
    check_int("n_hashes", n_hashes, minimum=1)
    nb = resolve_n_buckets(d.Nq, bucket_size, n_buckets)
    if rotations is None:
        rotations = random_rotations(n_hashes, d.D, nb, seed, q.device)
    else:
        _check_rotations(rotations, n_hashes, d.D, nb)
    work = work_dtype(q.dtype)

    def heads(h0: int, h1: int) -> Tensor:
        # the rotations are shared by the heads: a group of heads is the same computation
        qw, vw = q[:, h0:h1].to(work), v[:, h0:h1].to(work)
        buckets = lsh_buckets(qw, rotations, nb)  # [B, h, R, N]
        kw = unit(qw)
        qp, kp, vp = pad_head_dim(qw, kw, vw)  # Dv != D: zero columns (docs/design.md section 3)
        out, lse = sorted_chunk_attention(
            qp, kp, vp, buckets, chunk=bucket_size, scale=s, key_valid=key_padding_mask,
            causal=causal, look_back=True, exclude_self=True, dedup=dedup,
        )
        out = out[..., : d.Dv]
        # a token with nothing else visible in any round attends to itself (if it is a real key)
        alone = torch.isneginf(lse).unsqueeze(-1)
        if bool(alone.any()):
            own = vw if key_padding_mask is None else vw * key_padding_mask[:, None, :, None]
            out = torch.where(alone, own, out)
        return out

    # head groups under checkpointing: the peak is one group's sorted copies and
    # backward buffers (N = 16384, H = 8, D = 64: ~770 MiB -> see the report in tests)
    return by_head_groups(heads, d.B, d.H, d.Nq, max(d.D, d.Dv)).to(q.dtype)
