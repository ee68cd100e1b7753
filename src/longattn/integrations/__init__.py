"""Thin layers over the functional API for other frameworks (imported only when used).

- :mod:`longattn.integrations.transformers`: Hugging Face ``attn_implementation``.
"""
