"""Transformer models configured by one dataclass (nanoGPT-like, one file).

Stable API (the trainer, ``longattn.train``, relies on it)::

    from longattn.model import ModelConfig, Transformer
    cfg = ModelConfig(vocab_size=256, max_len=1024, dim=128, depth=2, heads=4,
                      mechanism="local", mechanism_params={"before": 64, "after": 64},
                      head="classify", num_classes=10, pool="mean")
    model = Transformer(cfg)
    logits = model(x, key_padding_mask=mask)

``x``: int64 tokens [B, N] (``input="tokens"``) or float features [B, N, in_dim]
(``input="continuous"``); ``key_padding_mask``: optional bool [B, N], True = a real
token. ``forward`` returns logits:

=================  ===================  ===========================================
``head``           output               use
=================  ===================  ===========================================
``"lm"``           [B, N, vocab_size]   language modelling (causal by default)
``"classify"``     [B, num_classes]     sequence classification (``pool`` cls/mean)
``"tokens"``       [B, N, num_classes]  per-position labels (e.g. associative recall)
=================  ===================  ===========================================

Extra keyword arguments of ``forward`` are per-call mechanism parameters (e.g.
``edge_index=`` for ``"graph"``). With ``aux_classes`` > 0 the model also has a per-token
auxiliary head: ``forward_with_aux`` returns ``(logits, aux_logits [B, N, aux_classes])``
from one pass (training with a task's intermediate targets; ``forward`` ignores it). :class:`EncoderDecoder` is the seq2seq model
(``forward(src, tgt, src_padding_mask, tgt_padding_mask) -> [B, Nt, vocab]``).
Token-by-token generation of LM models: :func:`longattn.decoding.generate`.

Positional encodings (``pos``): "sinusoidal" and "learned" are added to the
embeddings; "rope" rotates q and k in every layer; "alibi" adds a score bias
(mechanisms with the ``bias`` capability only, i.e. ``full``); "none".
Pooling "cls" prepends a learned CLS token that is global in every layer when the
mechanism can make positions global (see
:func:`longattn.layers.attention.global_support`), otherwise an ordinary first token
(with a sparse local pattern prefer ``pool="mean"``). ``global_tokens=G`` prepends G
learned tokens that are global in every layer and stripped before the head.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Union

import torch
from torch import Tensor, nn

from longattn.layers.attention import global_support, parse_mechanisms
from longattn.layers.blocks import Decoder, Encoder
from longattn.layers.positional import (
    FrequencyEncoding,
    LearnedPositionalEncoding,
    SinusoidalPositionalEncoding,
)
from longattn.layers.norms import NORMS
from longattn import registry

_SHARDS: ContextVar[Mapping[nn.Module, int]] = ContextVar("longattn_sequence_shards",
                                                         default=MappingProxyType({}))
# blocks open in any thread: while 0 the forward reads no ContextVar (which torch.compile
# cannot trace); a compiled model inside a shard block takes a graph break, never a wrong offset
_OPEN_SHARDS = 0


def _shard_of(model: nn.Module) -> int | None:
    return _SHARDS.get().get(model) if _OPEN_SHARDS else None


@contextmanager
def sequence_shard(model: nn.Module, index: int) -> Iterator[None]:
    """Within the block, an input of N positions given to ``model`` is shard ``index``
    of a longer sequence cut into equal shards: its absolute positions (sinusoidal or
    learned encodings) start at ``index * N``, passed to :meth:`Transformer.embed` as
    its ``offset``. Scoped by a :class:`contextvars.ContextVar` (this thread or asyncio
    task, until the block ends); other models are unchanged. Used by
    :class:`longattn.distributed.sequence_parallel`."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be an int >= 0, got {index!r}")
    global _OPEN_SHARDS
    token = _SHARDS.set(MappingProxyType({**_SHARDS.get(), model: index}))
    _OPEN_SHARDS += 1
    try:
        yield
    finally:
        _OPEN_SHARDS -= 1
        _SHARDS.reset(token)


_HEADS = ("lm", "classify", "tokens")
_POOLS = ("cls", "mean")
_POS = ("sinusoidal", "learned", "rope", "rope2d", "alibi", "none")
_INPUTS = ("tokens", "continuous")


@dataclass
class ModelConfig:
    """Everything a :class:`Transformer` needs. Validated on creation (ValueError)."""

    vocab_size: int = 256          # token vocabulary (input="tokens"; LM output size)
    max_len: int = 1024            # longest sequence (learned positions need it)
    dim: int = 128                 # model width
    depth: int = 2                 # number of blocks
    heads: int = 4                 # attention heads (must divide dim)
    kv_heads: int | None = None    # grouped KV heads (must divide heads); None: = heads
    mechanism: Union[str, list] = "full"   # registry name, or one item per head group
    mechanism_params: dict = field(default_factory=dict)  # parameters of a single mechanism
    causal: bool | None = None     # None -> True for head="lm", else False
    head: str = "lm"               # "lm" | "classify" | "tokens"
    num_classes: int = 2           # classes for "classify" / "tokens"
    pool: str = "mean"             # "cls" | "mean" (classify head)
    norm: str = "layer"            # "layer" | "rms" | "batch"
    prenorm: bool = True           # pre-norm (True) or post-norm blocks
    pos: str = "sinusoidal"        # "sinusoidal" | "learned" | "rope" | "rope2d" | "alibi" | "none"
    grid_width: int | None = None  # image width W of raster-ordered pixel inputs (pos="rope2d" needs it)
    dropout: float = 0.0           # residual / embedding / feed-forward dropout
    attn_dropout: float = 0.0      # attention dropout (mechanisms with a "dropout" param)
    mlp_ratio: int = 4             # feed-forward hidden = mlp_ratio * dim
    input: str = "tokens"          # "tokens" | "continuous"
    in_dim: int = 1                # features per position for input="continuous"
    freq_bands: int = 0            # frequency encoding bands L for continuous input (0 = off)
    global_tokens: int = 0         # learned global tokens prepended (non-causal only)
    tie_embeddings: bool = True    # LM head shares the token embedding
    aux_classes: int = 0           # > 0: a per-token auxiliary head for training (forward_with_aux)

    def __post_init__(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")

        for name in ("vocab_size", "max_len", "dim", "depth", "heads", "num_classes", "mlp_ratio", "in_dim"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if isinstance(self.aux_classes, bool) or not isinstance(self.aux_classes, int) or self.aux_classes < 0:
            raise ValueError(f"aux_classes must be an int >= 0, got {self.aux_classes!r}")
        kvh = self.kv_heads
        if kvh is not None and (isinstance(kvh, bool) or not isinstance(kvh, int) or kvh < 1 or self.heads % kvh):
            raise ValueError(f"kv_heads must be a positive int dividing heads ({self.heads}), got {kvh!r}")
        choice("head", _HEADS)
        choice("pool", _POOLS)
        choice("pos", _POS)
        choice("input", _INPUTS)
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {self.norm!r}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.global_tokens < 0:
            raise ValueError(f"global_tokens must be >= 0, got {self.global_tokens}")
        if self.is_causal and self.global_tokens:
            raise ValueError("global_tokens > 0 needs a non-causal model (a global token sees the future)")
        if self.is_causal and self.head == "classify" and self.pool == "cls":
            raise ValueError("a causal model cannot pool a leading CLS token; use pool='mean'")
        if self.pos == "rope" and (self.dim // self.heads) % 2:
            raise ValueError(f"pos='rope' needs an even head_dim, got {self.dim // self.heads}")
        if self.pos == "rope2d" and (self.grid_width is None or (self.dim // self.heads) % 4):
            raise ValueError(f"pos='rope2d' needs grid_width (the image width, got {self.grid_width!r}) "
                             f"and head_dim % 4 == 0 (got {self.dim // self.heads})")
        if self.pos == "sinusoidal" and self.dim % 2:
            raise ValueError(f"pos='sinusoidal' needs an even dim, got {self.dim}")

    @property
    def is_causal(self) -> bool:
        return (self.head == "lm") if self.causal is None else bool(self.causal)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positional_encoding(cfg: ModelConfig) -> nn.Module | None:
    """The additive positional encoding of ``cfg.pos`` ("sinusoidal", "learned"), else
    None ("rope" and "alibi" act inside attention, "none" is none)."""
    if cfg.pos == "sinusoidal":
        return SinusoidalPositionalEncoding(cfg.dim)
    if cfg.pos == "learned":
        return LearnedPositionalEncoding(cfg.dim, cfg.max_len)
    return None


def _block_options(cfg: ModelConfig) -> dict[str, Any]:
    """The keywords every Encoder/Decoder block takes from the config (norm, dropout,
    feed-forward width, rope/alibi)."""
    return dict(norm=cfg.norm, prenorm=cfg.prenorm, dropout=cfg.dropout, attn_dropout=cfg.attn_dropout,
                mlp_ratio=cfg.mlp_ratio, rope=cfg.pos in ("rope", "rope2d"), alibi=cfg.pos == "alibi",
                rope_grid=cfg.grid_width if cfg.pos == "rope2d" else None)


def _init_token_embedding(emb: nn.Embedding) -> None:
    """Token embeddings start at std dim^-0.5 and are read times sqrt(dim)
    (:func:`_embed_tokens`): unit-scale inputs beside the unit-amplitude sinusoidal
    positions (at GPT's std 0.02 the positions would drown the tokens 50:1 and
    content-based tasks barely learn), while a tied LM head keeps small weights."""
    nn.init.normal_(emb.weight, std=emb.embedding_dim ** -0.5)


def _embed_tokens(emb: nn.Embedding, x: Tensor) -> Tensor:
    return emb(x) * emb.embedding_dim ** 0.5


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class Transformer(nn.Module):
    """Encoder-only or decoder-only Transformer over any attention mechanism (see module doc)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        items = parse_mechanisms(cfg.mechanism, cfg.mechanism_params, cfg.heads)
        specs = [registry.get(name) for name, _ in items]
        modes = [global_support(s) for s in specs]
        can_global = all(m is not None and not (s.module is not None and m[0] == "param")
                         for s, m in zip(specs, modes))
        if cfg.input == "tokens":
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.freq = None
        else:
            self.freq = FrequencyEncoding(cfg.freq_bands)
            self.tok_emb = nn.Linear(self.freq.out_features(cfg.in_dim), cfg.dim)
        self.pos_enc = _positional_encoding(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        # prefix tokens: [CLS] then global tokens; global in every layer when possible
        self.use_cls = cfg.head == "classify" and cfg.pool == "cls"
        if cfg.global_tokens and not can_global:
            raise ValueError(
                f"global_tokens={cfg.global_tokens}: mechanism {cfg.mechanism!r} cannot make positions "
                "global (see longattn.layers.attention.global_support)"
            )
        self.n_prefix = int(self.use_cls) + cfg.global_tokens
        self.prefix_global = self.n_prefix > 0 and can_global and not cfg.is_causal
        self.prefix = nn.Parameter(torch.randn(self.n_prefix, cfg.dim) * 0.02) if self.n_prefix else None
        self.encoder = Encoder(
            cfg.dim, cfg.depth, cfg.heads, mechanism=cfg.mechanism,
            mechanism_params=cfg.mechanism_params, causal=cfg.is_causal, kv_heads=cfg.kv_heads,
            **_block_options(cfg),
        )
        out = cfg.vocab_size if cfg.head == "lm" else cfg.num_classes
        self.head = nn.Linear(cfg.dim, out, bias=cfg.head != "lm")
        self.aux_head = nn.Linear(cfg.dim, cfg.aux_classes) if cfg.aux_classes else None
        self.apply(_init_weights)
        if cfg.input == "tokens":
            _init_token_embedding(self.tok_emb)
        if isinstance(self.pos_enc, LearnedPositionalEncoding):
            self.pos_enc.reset_parameters()
        if cfg.head == "lm" and cfg.tie_embeddings and cfg.input == "tokens":
            self.head.weight = self.tok_emb.weight

    # -- pieces used by forward and by longattn.decoding ---------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.blocks

    @property
    def final_norm(self) -> nn.Module | None:
        return self.encoder.norm

    def embed(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """Token ids [B, N] or features [B, N, in_dim] at positions offset.. (or at
        ``positions`` [B, N]) -> [B, N, dim]."""
        cfg = self.cfg
        if cfg.input == "tokens":
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"x must be int tokens [B, N], got {x.dtype} {tuple(x.shape)}")
            h = _embed_tokens(self.tok_emb, x)
        else:
            if x.dim() != 3 or x.shape[-1] != cfg.in_dim or not x.is_floating_point():
                raise ValueError(f"x must be float features [B, N, {cfg.in_dim}], got {x.dtype} {tuple(x.shape)}")
            h = self.tok_emb(self.freq(x.to(self.tok_emb.weight.dtype)))
        if self.pos_enc is not None:
            h = self.pos_enc(h, offset) if positions is None else self.pos_enc(h, positions=positions)
        return self.drop(h)

    def features(self, x: Tensor, key_padding_mask: Tensor | None = None,
                 segment_ids: Tensor | None = None, **call_params: Any) -> Tensor:
        """Final hidden states [B, P + N, dim], P prefix (CLS/global) positions first.

        ``segment_ids`` [B, N]: documents packed in each row (runs of equal ids); each
        is computed as if alone (positions restart at its first token)."""
        positions = None
        if segment_ids is not None:
            if self.prefix is not None:
                raise ValueError("segment_ids (packed documents) cannot be used with a CLS or global-token prefix")
            from longattn.ops.packing import check_segment_ids, document_positions

            positions = document_positions(check_segment_ids(segment_ids, x.shape[0], x.shape[1]))
            call_params["segment_ids"] = segment_ids
        shard = _shard_of(self)
        if shard is not None and positions is not None:
            raise ValueError("a sequence shard (sequence parallelism) does not support explicit positions "
                             "(segment_ids)")
        h = self.embed(x, 0 if shard is None else shard * x.shape[1], positions=positions)
        B = h.shape[0]
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != tuple(h.shape[:2]):
            raise ValueError(f"key_padding_mask must be [B, N] = {list(h.shape[:2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if self.prefix is not None:
            h = torch.cat((self.prefix.to(h.dtype).expand(B, -1, -1), h), dim=1)
            if key_padding_mask is not None:
                real = torch.ones(B, self.n_prefix, dtype=torch.bool, device=h.device)
                key_padding_mask = torch.cat((real, key_padding_mask), dim=1)
        n_global = self.n_prefix if self.prefix_global else 0
        return self.encoder(h, key_padding_mask, n_global, **call_params)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, **call_params: Any) -> Tensor:
        """Logits: [B, N, vocab] (lm), [B, num_classes] (classify), [B, N, num_classes] (tokens).
        ``segment_ids=`` [B, N] packs documents (see :meth:`features`)."""
        return self._logits(self.features(x, key_padding_mask, **call_params), key_padding_mask)

    def forward_with_aux(self, x: Tensor, key_padding_mask: Tensor | None = None,
                         **call_params: Any) -> tuple[Tensor, Tensor]:
        """(the logits of :meth:`forward`, per-token auxiliary logits [B, N, aux_classes])
        from one pass; for training with intermediate targets (``aux_classes`` > 0)."""
        if self.aux_head is None:
            raise ValueError("forward_with_aux needs a model built with aux_classes > 0")
        h = self.features(x, key_padding_mask, **call_params)
        return self._logits(h, key_padding_mask), self.aux_head(h[:, self.n_prefix:])

    def _logits(self, h: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        P = self.n_prefix
        if self.cfg.head != "classify":
            return self.head(h[:, P:])
        if self.use_cls:
            return self.head(h[:, 0])
        body = h[:, P:]
        if key_padding_mask is None:
            pooled = body.mean(1)
        else:
            m = key_padding_mask.to(body.dtype)[..., None]
            pooled = (body * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class EncoderDecoder(nn.Module):
    """Seq2seq Transformer (Vaswani et al. 2017): encoder over src, causal decoder over tgt.

    The encoder uses ``cfg.mechanism`` (non-causal); the decoder's self-attention uses
    the same mechanism, causal; cross-attention uses ``cross_mechanism`` (needs
    ``spec.cross``). Positional encoding: ``cfg.pos`` (sinusoidal/learned/rope/alibi/none).
    Output: ``forward(src, tgt, ...) -> [B, Nt, vocab_size]`` (teacher forcing).
    """

    def __init__(self, cfg: ModelConfig, *, src_vocab_size: int | None = None,
                 decoder_depth: int | None = None, cross_mechanism: Any = "full",
                 cross_params: dict | None = None) -> None:
        super().__init__()
        if cfg.input != "tokens":
            raise ValueError("EncoderDecoder takes token inputs (input='tokens')")
        self.cfg = cfg
        self.src_emb = nn.Embedding(src_vocab_size or cfg.vocab_size, cfg.dim)
        self.tgt_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_enc = _positional_encoding(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        common = _block_options(cfg)
        self.encoder = Encoder(cfg.dim, cfg.depth, cfg.heads, mechanism=cfg.mechanism,
                               mechanism_params=cfg.mechanism_params, causal=False, **common)
        self.decoder = Decoder(cfg.dim, decoder_depth or cfg.depth, cfg.heads, mechanism=cfg.mechanism,
                               mechanism_params=cfg.mechanism_params, cross_mechanism=cross_mechanism,
                               cross_params=cross_params, **common)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(_init_weights)
        if isinstance(self.pos_enc, LearnedPositionalEncoding):
            self.pos_enc.reset_parameters()
        _init_token_embedding(self.src_emb)
        _init_token_embedding(self.tgt_emb)
        if cfg.tie_embeddings:
            self.head.weight = self.tgt_emb.weight

    def _embed(self, emb: nn.Embedding, x: Tensor) -> Tensor:
        h = _embed_tokens(emb, x)
        if self.pos_enc is not None:
            h = self.pos_enc(h)
        return self.drop(h)

    def encode(self, src: Tensor, src_padding_mask: Tensor | None = None) -> Tensor:
        return self.encoder(self._embed(self.src_emb, src), src_padding_mask)

    def decode(self, tgt: Tensor, memory: Tensor, tgt_padding_mask: Tensor | None = None,
               src_padding_mask: Tensor | None = None) -> Tensor:
        h = self.decoder(self._embed(self.tgt_emb, tgt), memory, tgt_padding_mask, src_padding_mask)
        return self.head(h)

    def forward(self, src: Tensor, tgt: Tensor, src_padding_mask: Tensor | None = None,
                tgt_padding_mask: Tensor | None = None) -> Tensor:
        """src [B, Ns], tgt [B, Nt] int64 -> logits [B, Nt, vocab_size]."""
        return self.decode(tgt, self.encode(src, src_padding_mask), tgt_padding_mask, src_padding_mask)

    @torch.no_grad()
    def greedy(self, src: Tensor, bos: int, max_new_tokens: int,
               src_padding_mask: Tensor | None = None) -> Tensor:
        """Greedy decoding by re-running the target prefix (O(T^2) total); -> [B, 1 + new]."""
        memory = self.encode(src, src_padding_mask)
        out = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
        for _ in range(max_new_tokens):
            nxt = self.decode(out, memory, None, src_padding_mask)[:, -1].argmax(-1)
            out = torch.cat((out, nxt[:, None]), dim=1)
        return out
