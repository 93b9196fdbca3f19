"""Conditioning encoders that turn labels into UNet cross-attention context.

``ClassEmbedder`` is the class-conditional LDM (cin256) encoder: a learned table of class vectors used as a
context of length 1. Its one parameter ``embedding/embedding`` [n_classes, embed_dim] is the CompVis key
``cond_stage_model.embedding.weight`` (strip the ``cond_stage_model.`` prefix before converting).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class ClassEmbedder(nn.Module):
    """Class labels -> a length-1 context sequence.

    Attributes:
      embed_dim: context width D (the UNet's ``context_dim``).
      n_classes: table size; cin256-v2 uses 1001 with class 1000 as the null label for guidance.
      dtype: dtype of the returned context (the table is float32).
    """

    embed_dim: int
    n_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        """labels: [B] int in [0, n_classes) -> context [B, 1, embed_dim] in ``dtype``."""
        table = nn.Embed(
            self.n_classes,
            self.embed_dim,
            embedding_init=nn.initializers.normal(1.0),  # torch nn.Embedding default N(0, 1)
            name="embedding",
        )
        return table(labels)[:, None, :].astype(self.dtype)
