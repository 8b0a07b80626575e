"""The forward pass shared by every decoder-only port.

A concrete model supplies ``embed``, ``blocks``, ``final_norm`` and ``unembed``; this
module owns what is the same for all of them: input checks, positions from the mask,
the attention mask (padding, causality, sliding window, KV cache), Hugging Face's
``hidden_states`` convention, and sowing of intermediate states.

Layer types. Each block is ``FULL`` or ``SLIDING`` (``ModelConfig.layer_type``); the
forward builds one attention mask and one set of RoPE tables (the ``rope`` hook) per type
that occurs, and gives every block those of its type. A model with one type (Llama,
Mistral, ...) builds exactly one of each.

Logits. ``unembed`` is the affine output projection; a final logit soft-cap
(``final_logit_softcapping``, Gemma) is applied after it, in float32, by the forward.

Sowing. ``taps=Taps(layers=(i, ...), apply_norm=...)`` makes the forward sow hidden
state ``i`` (HF index: 0 = embedding output, i < L after block i, L = after the final
norm) as a :class:`HiddenState`; with ``projections={i: W_i [D, K]}`` it sows the
product ``h_i @ W_i`` as a :class:`LayerProjection` instead, so a fused SWIFT head never
holds the [T, D] states of a layer. Read them with ``nnx.capture``; under jit anything
not captured is dead code and never materialised.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from swiftjax._checks import check_int, check_rank, check_same_shape
from swiftjax.models import cache as kv
from swiftjax.models.config import ModelConfig


class HiddenState(nnx.Intermediate):
    """A sown residual-stream state [B, T, D]."""


class LayerProjection(nnx.Intermediate):
    """A sown per-layer projection h_i @ W_i [B, T, K] (float32)."""


@dataclasses.dataclass(frozen=True)
class Taps:
    """Which hidden-state indices (HF convention, 0..L) a forward sows."""

    layers: tuple[int, ...] = ()
    apply_norm: bool = False


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CausalLMOutput:
    logits: jax.Array | None
    hidden_states: tuple | None = None
    cache: kv.KVCache | None = None


def _is_concrete(*xs) -> bool:
    """True when no array is a jit tracer (an eager call), so values can be read on the host."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_ids_concrete(input_ids, attention_mask, vocab_size: int) -> None:
    """Eager calls only: token ids at nonzero-mask positions must lie in [0, vocab_size)
    (an id >= V embeds NaN, -1 silently reads the last row). Skipped under tracing."""
    if _is_concrete(input_ids, attention_mask):
        from swiftjax.sampling import check_ids_in_vocab

        check_ids_in_vocab(input_ids, attention_mask, int(vocab_size), "input_ids")


def positions_from_mask(mask, start=None):
    """Position ids: cumsum(mask) - 1 (clipped at 0), offset by ``start`` [B] if given."""
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
    if start is not None:
        pos = pos + start[:, None]
    return jnp.maximum(pos, 0)


class DecoderLM(nnx.Module):
    """Base class: subclasses set ``self.config`` and implement the four hooks."""

    config: ModelConfig

    # hooks ------------------------------------------------------------------
    def embed(self, input_ids, positions):  # pragma: no cover - abstract
        raise NotImplementedError

    def blocks(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def final_norm(self, h):  # pragma: no cover - abstract
        raise NotImplementedError

    def unembed(self, h):  # pragma: no cover - abstract
        """The affine output projection [.., D] -> [.., V] (before any logit soft-capping)."""
        raise NotImplementedError

    def logits(self, h):
        """float32 logits of final normed states ``h`` [.., D]: the output projection, then the
        config's logit soft-capping (the forward's own last step)."""
        from swiftjax.models.layers import softcap

        return softcap(self.unembed(h).astype(jnp.float32), self.config.final_logit_softcapping)

    def rope(self, positions, layer_type: str):
        """Per-forward position tables for the blocks of ``layer_type`` (None for learned positions)."""
        return None

    # forward ----------------------------------------------------------------
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        output_hidden_states: bool = False,
        *,
        cache: kv.KVCache | None = None,
        positions=None,
        taps: Taps | None = None,
        projections: Mapping[int, jax.Array] | None = None,
        compute_logits: bool = True,
        last_only: bool = False,
    ) -> CausalLMOutput:
        """input_ids [B, T] int; attention_mask [B, T] (1 = token, 0 = left padding).

        Returns logits [B, T, V] float32 (or [B, 1, V] with ``last_only``), the L+1
        hidden states when asked, and the updated cache when one is given.
        """
        cfg = self.config
        check_rank(input_ids, "input_ids", 2, "[B, T]")
        check_int(input_ids, "input_ids")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        else:
            check_rank(attention_mask, "attention_mask", 2, "[B, T]")
            check_same_shape(input_ids, attention_mask, "input_ids", "attention_mask")
        check_ids_concrete(input_ids, attention_mask, cfg.vocab_size)
        t = input_ids.shape[1]
        if cache is not None:
            if cache.batch != input_ids.shape[0]:
                raise ValueError(f"cache: expected batch {input_ids.shape[0]}, got {cache.batch}")
            if positions is None:
                positions = positions_from_mask(attention_mask, cache.next_pos)
            key_valid = kv.write(cache.key_valid, attention_mask.astype(bool), cache.cursor)
            cursor = cache.cursor
        else:
            if positions is None:
                positions = positions_from_mask(attention_mask)
            key_valid = attention_mask.astype(bool)
            cursor = jnp.zeros((), jnp.int32)
        if cfg.is_gpt2 and t > cfg.max_position_embeddings and cache is None:
            raise ValueError(
                f"input_ids: expected at most {cfg.max_position_embeddings} positions, got {t}"
            )

        from swiftjax.models.layers import allowed_mask

        # one (RoPE tables, mask) per distinct layer type (Gemma: sliding / full), shared by its blocks
        layer_types = [cfg.layer_type(i) for i in range(cfg.num_layers)]
        context = {lt: (self.rope(positions, lt), allowed_mask(key_valid, cursor, t, cfg.window(lt)))
                   for lt in dict.fromkeys(layer_types)}
        taps = taps or Taps()
        wanted = set(taps.layers)
        n_states = cfg.num_layers + 1
        bad = [i for i in wanted if not 0 <= i < n_states]
        if bad:
            raise ValueError(f"taps.layers: expected indices in [0, {n_states - 1}], got {bad}")

        all_states = [] if output_hidden_states else None

        def emit(i, h):
            if all_states is not None:
                all_states.append(h)
            if i in wanted:
                x = self.final_norm(h) if taps.apply_norm else h
                if projections is not None and i in projections:
                    w = projections[i]
                    self.sow(LayerProjection, f"proj_{i:03d}",
                             jnp.einsum("btd,dk->btk", x.astype(jnp.float32), w.astype(jnp.float32)))
                else:
                    self.sow(HiddenState, f"state_{i:03d}", x)

        # padding ids are never read: an out-of-range one would embed NaN that leaks through attention
        h = self.embed(jnp.where(attention_mask != 0, input_ids, 0), positions)
        emit(0, h)
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks()):
            layer_kv = None if cache is None else (cache.k[i], cache.v[i])
            tables, allowed = context[layer_types[i]]
            h, (k_i, v_i) = block(h, tables, allowed, layer_kv, cursor)
            new_k.append(k_i)
            new_v.append(v_i)
            if i < cfg.num_layers - 1:
                emit(i + 1, h)
        h = self.final_norm(h)
        emit(cfg.num_layers, h)

        logits = None
        if compute_logits:
            logits = self.logits(h[:, -1:] if last_only else h)
        new_cache = None
        if cache is not None:
            new_cache = kv.KVCache(
                k=tuple(new_k), v=tuple(new_v), key_valid=key_valid,
                cursor=cache.cursor + t,
                next_pos=cache.next_pos + jnp.sum(attention_mask.astype(jnp.int32), axis=1),
            )
        return CausalLMOutput(
            logits=logits,
            hidden_states=tuple(all_states) if all_states is not None else None,
            cache=new_cache,
        )
