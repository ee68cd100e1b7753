"""Multi-head attention over any registered mechanism (or one mechanism per head group).

    >>> mha = MultiHeadAttention(256, 8, "full")                   # one mechanism
    >>> mha = MultiHeadAttention(256, 8, "local", before=64, after=64)
    >>> mha = MultiHeadAttention(256, 8, ["local", ("strided", {"stride": 64}),
    ...                                   ("global", {"idx": (0,)}), "local"])
    >>> y = mha(x, key_padding_mask=mask)                          # x [B, N, 256]

Q, K, V and output projections (Vaswani et al. 2017) around a mechanism from
:mod:`longattn.registry`. The heads are split evenly into ``len(mechanism)`` groups
when a list is given: group g owns heads [g*H/G, (g+1)*H/G) and computes them with
its own mechanism and parameters -- the lecture form of Longformer (local + strided
+ global heads) and BigBird (random + local + strided + global heads). Learned
mechanisms are submodules built by :func:`longattn.api.build`.

Features (each refused with a clear ValueError where the mechanism cannot do it):

- ``causal=True``: the mechanism must have ``spec.causal``.
- cross-attention: ``forward(x, context)``; every mechanism must have ``spec.cross``.
- ``rope=True``: rotary embedding of q and k (any mechanism).
- ``alibi=True``: an ALiBi score bias ``bias=[1, H, Nq, Nk]`` passed to mechanisms with
  ``spec.bias`` (an Nq x Nk tensor: meant for ``full``). With ``segment_ids`` each
  packed document gets its own Nd x Nd bias, positions restarting at its first token.
- ``attn_dropout``: passed as the mechanism's ``dropout`` parameter in training
  (mechanisms without a ``dropout`` parameter refuse a non-zero value).
- ``global_tokens=G``: G learned tokens are prepended, made global (they see every
  position and every position sees them) and stripped from the output. The model may
  also mark the first ``n_global`` positions of its input as global (``forward(...,
  n_global=)``). How a mechanism makes positions global, see :func:`global_support`:
  a mechanism whose registration names a global-index parameter
  (its registry field ``global_param``, or a parameter called ``global_idx``) gets
  the indices (a tuple of ints, merged with any the user gave); a mechanism where
  every query attends to every key (family ``"dense"``, or the registry field
  ``all_keys``) needs nothing; any other mechanism refuses global tokens with a
  ValueError (an exact union of its pattern with global rows/columns would need its
  log-sum-exp, which the functional API does not expose).

Cost: the projections are O(N * dim^2); the attention is the mechanism's cost.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import Tensor, nn

from longattn import api, registry
from longattn.layers.positional import RotaryEmbedding, alibi_bias, alibi_slopes
from longattn import compile_ops as custom
from longattn.ops.packing import with_document_arguments
from longattn.registry import Mechanism

MechanismItem = Union[str, tuple[str, dict]]
MechanismArg = Union[str, Sequence[MechanismItem]]

_LAYER_PARAMS = ("bias",)  # parameters the layer manages itself (alibi=True)


def global_support(spec: Mechanism) -> tuple[str, str | None] | None:
    """How ``spec`` can make positions global: ``("param", name)``, ``("all", None)`` or None."""
    name = spec.global_param
    if name is None and "global_idx" in spec.param_names:
        name = "global_idx"
    if name is not None:
        return ("param", name)
    if spec.family == "dense" or spec.all_keys:
        return ("all", None)
    return None


def parse_mechanisms(mechanism: MechanismArg, params: dict[str, Any], heads: int) -> list[tuple[str, dict]]:
    """Normalise ``mechanism`` to a list of (name, params), one per head group.

    A str takes ``params``; a list's items are names or (name, params) tuples and
    ``params`` must then be empty. Raises ValueError/TypeError naming the argument.
    """
    if isinstance(mechanism, str):
        return [(mechanism, dict(params))]
    if not isinstance(mechanism, (list, tuple)) or len(mechanism) == 0:
        raise TypeError(
            f"mechanism must be a name or a non-empty list of names / (name, params), got {mechanism!r}"
        )
    if params:
        raise TypeError(
            f"with a per-head mechanism list give parameters inside the list as (name, params); "
            f"got extra parameters {sorted(params)}"
        )
    out = []
    for item in mechanism:
        if isinstance(item, str):
            out.append((item, {}))
        elif (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
              and isinstance(item[1], dict)):
            out.append((item[0], dict(item[1])))
        else:
            raise TypeError(f"mechanism list item must be a name or (name, params dict), got {item!r}")
    if heads % len(out):
        raise ValueError(
            f"heads ({heads}) must be divisible by the number of mechanism groups ({len(out)})"
        )
    return out


class HeadGroup(nn.Module):
    """Heads [start, stop) of a MultiHeadAttention, computed by one mechanism.

    Holds the spec, the parameters, and for learned mechanisms the module built by
    :func:`longattn.api.build`. ``forward`` takes [B, h, N, D] tensors.
    """

    def __init__(self, name: str, params: dict[str, Any], start: int, stop: int, head_dim: int, *,
                 causal: bool, attn_dropout: float, alibi: bool, global_tokens: int) -> None:
        super().__init__()
        spec = registry.get(name)
        spec.check_params(params, complete=False)  # required ones may come per call
        managed = sorted(set(params) & set(_LAYER_PARAMS))
        if managed:
            raise TypeError(
                f"parameter(s) {managed} of {name!r} are set by the layer (use alibi=True), "
                "or call longattn.attention directly"
            )
        if causal and not spec.causal:
            raise ValueError(f"mechanism {name!r} cannot be causal (causal=True was given)")
        if alibi and not spec.bias:
            raise ValueError(
                f"alibi=True needs a mechanism that accepts a score bias; {name!r} does not "
                f"(spec.bias=False)"
            )
        if attn_dropout and "dropout" not in spec.param_names:
            raise ValueError(
                f"attn_dropout={attn_dropout} but mechanism {name!r} has no 'dropout' parameter"
            )
        self.global_mode = global_support(spec)
        if global_tokens and self.global_mode is None:
            raise ValueError(
                f"global_tokens={global_tokens} needs a mechanism that can make positions global; "
                f"{name!r} cannot (see longattn.layers.attention.global_support)"
            )
        self.spec, self.name = spec, name
        self.start, self.stop, self.head_dim = start, stop, head_dim
        self.params = dict(params)
        self.attn_dropout = float(attn_dropout)
        self.impl: nn.Module | None = None
        if spec.module is not None:
            if self.global_mode is not None and self.global_mode[0] == "param":
                self.global_mode = None  # a learned module takes no per-call parameters
                if global_tokens:
                    raise ValueError(f"learned mechanism {name!r} cannot take global tokens")
            extra = {"dropout": self.attn_dropout} if attn_dropout else {}
            self.impl = api.build(name, heads=stop - start, head_dim=head_dim, **params, **extra)

    @property
    def heads(self) -> int:
        return self.stop - self.start

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
                key_padding_mask: Tensor | None, bias: Tensor | None = None,
                global_idx: tuple[int, ...] = (), shift: int = 0, segment_ids: Tensor | None = None,
                alibi_slopes: Tensor | None = None, key_state: Any = None, **call_params: Any) -> Tensor:
        """q [B, h, Nq, D]; k, v [B, h_kv, Nk, .] (grouped KV heads when h_kv < h);
        ``segment_ids`` [B, N]: packed documents (mechanisms with ``packed``).
        ``bias``: a score bias for the whole call ([1|B, h, Nq, Nk]); ``alibi_slopes``
        [h]: ALiBi built inside every call the mechanism makes, at that call's length
        (each packed document gets its own Nd x Nd bias, positions from its first token).
        ``key_state``: the state a KV cache keeps beside k for this mechanism (the
        registry's ``key_state``; :class:`longattn.decoding.PatternCache` passes it)."""
        if global_idx and self.global_mode is None:
            raise ValueError(f"mechanism {self.name!r} cannot make positions global")
        if bias is not None and alibi_slopes is not None:
            raise ValueError("give bias (one for the whole call) or alibi_slopes (built per call), not both")
        if self.impl is not None:
            if call_params:
                raise TypeError(f"learned mechanism {self.name!r} takes no per-call parameters "
                                f"{sorted(call_params)}")
            impl = self.impl
            if torch.compiler.is_compiling():  # one custom op, no graph break (longattn.ops.custom)
                return custom.module_attention(self.name, impl, q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                               segment_ids=segment_ids, params=self.params)
            return api.run(
                self.spec, lambda q, k, v, kpm: impl(q, k, v, causal=causal, key_padding_mask=kpm, scale=None),
                q, k, v, causal=causal, key_padding_mask=key_padding_mask, segment_ids=segment_ids,
                params=self.params, owner=self)
        params = self.spec.resolve({**self.params, **call_params})
        if "dropout" in self.spec.param_names and "dropout" not in self.params:
            params["dropout"] = self.attn_dropout if self.training else 0.0
        if bias is not None:
            params["bias"] = bias
        if self.global_mode is not None and self.global_mode[0] == "param":
            pname = self.global_mode[1]
            user = params.get(pname)
            if global_idx or shift:
                params[pname] = tuple(global_idx) + tuple(i + shift for i in _as_index_tuple(user))
        if torch.compiler.is_compiling() and alibi_slopes is None:  # one custom op (longattn.ops.custom)
            # (a key_state only spares recomputation: the op recomputes, same result)
            return custom.attention(q, k, v, self.name, causal=causal, key_padding_mask=key_padding_mask,
                                    segment_ids=segment_ids, **params)
        bound, fn = api.bind(self.spec, params, causal=causal, scale=None, key_state=key_state), self.spec.fn

        def call(q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None) -> Tensor:
            if alibi_slopes is None:
                return bound(q, k, v, kpm)
            bias = alibi_bias(alibi_slopes, q.shape[2], k.shape[2], device=q.device).to(q.dtype)
            return with_document_arguments(
                lambda: fn(q, k, v, causal=causal, key_padding_mask=kpm, scale=None, **{**params, "bias": bias}))

        return api.run(self.spec, call, q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                            segment_ids=segment_ids, params=params, owner=self)

    def extra_repr(self) -> str:
        return f"{self.name}, heads=[{self.start}, {self.stop}), params={self.params}"


def _as_index_tuple(x: Any) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, Tensor):
        return tuple(int(i) for i in x.flatten().tolist())
    if isinstance(x, int):
        return tuple(range(x))
    return tuple(int(i) for i in x)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with any registered mechanism; batch-first [B, N, dim].

    Args:
        dim: model width; must be divisible by ``heads``.
        heads: number of heads H (head_dim = dim // H).
        mechanism: a registered name, or a list with one item per head group
            (a name or a (name, params) tuple).
        causal: query i sees keys j <= i (self-attention only).
        global_tokens: number of learned global tokens prepended and stripped.
        rope: rotary position embedding of q and k.
        rope_grid: image width W for 2D (axial) RoPE over raster-ordered pixels (None: 1D).
        alibi: ALiBi score bias (mechanisms with ``spec.bias`` only).
        attn_dropout: attention-probability dropout (mechanisms with ``dropout``).
        kv_dim: width of the cross-attention context (default ``dim``).
        kv_heads: grouped KV heads (GQA, Ainslie et al. 2023): K and V get
            ``kv_heads`` heads (H % kv_heads == 0) and query head h reads kv head
            h // (H / kv_heads); default H (multi-head). Mechanisms with ``gqa``
            never repeat K/V; the others get them repeated.
        qkv_bias: bias in the q/k/v projections.
        **params: the mechanism's parameters (single-mechanism form only).
    """

    def __init__(self, dim: int, heads: int, mechanism: MechanismArg = "full", *, causal: bool = False,
                 global_tokens: int = 0, rope: bool = False, alibi: bool = False,
                 attn_dropout: float = 0.0, kv_dim: int | None = None, qkv_bias: bool = True,
                 rope_base: float = 10000.0, kv_heads: int | None = None, rope_grid: int | None = None,
                 **params: Any) -> None:
        super().__init__()
        for nm, val in (("dim", dim), ("heads", heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{nm} must be a positive int, got {val!r}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
            raise ValueError(f"global_tokens must be an int >= 0, got {global_tokens!r}")
        if global_tokens and causal:
            raise ValueError("global_tokens > 0 cannot be causal: a global token sees the future")
        if not 0.0 <= attn_dropout < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1), got {attn_dropout}")
        kv_heads = heads if kv_heads is None else kv_heads
        if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads must be a positive int dividing heads ({heads}), got {kv_heads!r}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.kv_heads = kv_heads
        self.causal, self.global_tokens = causal, global_tokens
        self.use_alibi = alibi
        items = parse_mechanisms(mechanism, params, heads)
        per = heads // len(items)
        g = heads // kv_heads
        if per % g and g % per:
            raise ValueError(
                f"{len(items)} head groups of {per} heads do not align with kv groups of {g} query heads "
                f"(heads={heads}, kv_heads={kv_heads}): choose kv_heads so that one divides the other"
            )
        self.groups = nn.ModuleList(
            HeadGroup(name, p, g * per, (g + 1) * per, self.head_dim, causal=causal,
                      attn_dropout=attn_dropout, alibi=alibi, global_tokens=global_tokens)
            for g, (name, p) in enumerate(items)
        )
        kv_dim = dim if kv_dim is None else kv_dim
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(kv_dim, kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(kv_dim, kv_heads * self.head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        if rope_grid is not None and not rope:
            raise ValueError(f"rope_grid={rope_grid!r} is the image width of 2D RoPE: it needs rope=True")
        self.rope = RotaryEmbedding(self.head_dim, rope_base, rope_grid) if rope else None
        if alibi:
            self.register_buffer("alibi_slopes", alibi_slopes(heads), persistent=False)
        self.global_emb = nn.Parameter(torch.randn(global_tokens, dim) * 0.02) if global_tokens else None

    @property
    def mechanisms(self) -> list[str]:
        return [g.name for g in self.groups]

    def _split(self, x: Tensor) -> Tensor:  # [B, N, heads * D] -> [B, heads, N, D]
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def _kv_slice(self, start: int, stop: int) -> slice:
        """The kv heads that query heads [start, stop) read."""
        g = self.heads // self.kv_heads
        return slice(start // g, max(start // g + 1, stop // g))

    def forward(self, x: Tensor, context: Tensor | None = None, *,
                key_padding_mask: Tensor | None = None, n_global: int = 0,
                segment_ids: Tensor | None = None, **call_params: Any) -> Tensor:
        """x [B, Nq, dim] (and context [B, Nk, kv_dim] for cross-attention) -> [B, Nq, dim].

        ``key_padding_mask``: bool [B, Nk] over the keys (x, or context when given),
        True = real. ``n_global``: the first n_global positions of x are global.
        ``segment_ids``: integer [B, N], documents packed in each row (runs of equal
        ids): each attends as if alone, RoPE and ALiBi positions restart at each document.
        ``call_params``: per-call mechanism parameters (e.g. ``edge_index`` for graph).
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, N, {self.dim}], got {tuple(x.shape)}")
        B, N, _ = x.shape
        G = self.global_tokens
        if context is not None:
            bad = [g.name for g in self.groups if not g.spec.cross]
            if bad:
                raise ValueError(f"cross-attention (context given) is not supported by mechanism(s) {bad}")
            if self.causal:
                raise ValueError("causal=True cannot be used with cross-attention (context given)")
            if G or n_global:
                raise ValueError("global tokens are for self-attention; context was given")
            if context.dim() != 3 or context.shape[0] != B:
                raise ValueError(f"context must be [B={B}, Nk, kv_dim], got {tuple(context.shape)}")
        if n_global:
            if self.causal:
                raise ValueError("n_global > 0 cannot be causal: a global position sees the future")
            if n_global > N:
                raise ValueError(f"n_global ({n_global}) exceeds the sequence length ({N})")
        positions = None
        if segment_ids is not None:
            if context is not None or G or n_global:
                raise ValueError("segment_ids (packed documents) is for self-attention without global tokens")
            from longattn.ops.packing import check_segment_ids, document_positions

            positions = document_positions(check_segment_ids(segment_ids, B, N))
        if G:
            x = torch.cat((self.global_emb.to(x.dtype).expand(B, G, self.dim), x), dim=1)
            if key_padding_mask is not None:
                real = torch.ones(B, G, dtype=torch.bool, device=x.device)
                key_padding_mask = torch.cat((real, key_padding_mask), dim=1)
        src = x if context is None else context
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(src)), self._split(self.v_proj(src))
        if self.rope is not None:
            q, k = self.rope.rotate(q, positions=positions), self.rope.rotate(k, positions=positions)
        bias = slopes = None
        if self.use_alibi and segment_ids is not None:
            slopes = self.alibi_slopes  # per document: each document call builds its own bias
        elif self.use_alibi:
            bias = alibi_bias(self.alibi_slopes, q.shape[2], k.shape[2], device=x.device).to(q.dtype)
        gidx = tuple(range(G + n_global))
        outs = []
        for grp in self.groups:
            s, skv = slice(grp.start, grp.stop), self._kv_slice(grp.start, grp.stop)
            outs.append(grp(q[:, s], k[:, skv], v[:, skv], causal=self.causal,
                            key_padding_mask=key_padding_mask,
                            bias=None if bias is None else bias[:, s],
                            alibi_slopes=None if slopes is None else slopes[s],
                            global_idx=gidx, shift=G, segment_ids=segment_ids, **call_params))
        out = torch.cat(outs, dim=1).transpose(1, 2).flatten(2)   # [B, G+N, dim]
        return self.out_proj(out[:, G:])

    def step(self, x: Tensor, states: Sequence[Any], pos: int) -> Tensor:
        """One decoding step: x [B, 1, dim] at position ``pos`` -> [B, 1, dim].

        ``states`` holds one decoding state per head group (see
        :mod:`longattn.decoding`); each takes [B, h, 1, D] q/k/v and returns the
        output of that new query over every key it has seen.
        """
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(x)), self._split(self.v_proj(x))
        if self.rope is not None:
            q, k = self.rope.rotate(q, offset=pos), self.rope.rotate(k, offset=pos)
        outs = []
        for grp, st in zip(self.groups, states):
            s, skv = slice(grp.start, grp.stop), self._kv_slice(grp.start, grp.stop)
            outs.append(st.step(q[:, s], k[:, skv], v[:, skv], pos))
        return self.out_proj(torch.cat(outs, dim=1).transpose(1, 2).flatten(2))


class GraphAttention(MultiHeadAttention):
    """Multi-head attention restricted to the edges of a graph (mechanism ``"graph"``).

    ``forward(x, edge_index)``: x node features [N, dim] or [B, N, dim] (one graph
    shared by the batch); edge_index LongTensor [2, E] with row 0 the source (key j)
    and row 1 the target (query i). Node i attends over its in-neighbours with a
    softmax over those edges only (Velickovic et al. 2018 in dot-product form), O(E)
    through the registered ``graph`` mechanism. A node without in-edges gets zeros.
    """

    def __init__(self, dim: int, heads: int, **kw: Any) -> None:
        super().__init__(dim, heads, "graph", **kw)

    def forward(self, x: Tensor, edge_index: Tensor, *,  # type: ignore[override]
                key_padding_mask: Tensor | None = None) -> Tensor:
        if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must be a LongTensor [2, E], got {edge_index!r:.80}")
        unbatched = x.dim() == 2
        if unbatched:
            x = x[None]
        out = super().forward(x, key_padding_mask=key_padding_mask, edge_index=edge_index)
        return out[0] if unbatched else out
