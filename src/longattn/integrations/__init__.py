"""Thin layers over the functional API for other frameworks (imported only when used).

- :mod:`longattn.integrations.transformers`: Hugging Face ``attn_implementation`` (every
  layer type honoured) and :class:`~longattn.integrations.transformers.SinkWindowCache`.
- :mod:`longattn.integrations.hf_recurrent`: the linear-attention layers of Hugging Face
  hybrid models (Qwen3-Next, Qwen3.5, Kimi-Linear) on :mod:`longattn.ops.recurrent`.
"""
