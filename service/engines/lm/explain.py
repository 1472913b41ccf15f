"""The text model explained: its attention weights over a prompt and what the sampler would draw next.

One forward pass of the served model itself (`Transformer.forward` with its attention list, no KV
cache), and the sampler's own `sampling_distribution`, so the explanation is the deployment's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from service.engines.lm.model import Transformer
from service.engines.lm.sampling import SamplingParams, sampling_distribution
from service.engines.lm.tokenizer import Tokenizer
from service.errors import InvalidArgument, TooLarge


@dataclass(frozen=True)
class NextTokenExplanation:
    """The `top_n` most likely next tokens, most likely first."""

    token_ids: list[int]
    tokens: list[str]  # each id decoded alone
    logits: list[float]
    probabilities: list[float]  # softmax(logits / temperature)
    kept_by_top_k: list[bool]
    kept_by_top_p: list[bool]
    distribution: list[float]  # what the sampler draws from: both filters, renormalised over every kept token


@dataclass(frozen=True)
class TextExplanation:
    token_ids: list[int]
    tokens: list[str]  # each id decoded alone
    layers: list[int]
    heads: list[int]
    attention: Tensor  # (len(layers), len(heads), T, T) causal softmax weights
    next_token: NextTokenExplanation


class SelectedAttention(list):
    """The list `Transformer.forward` appends each layer's weights (1, n_heads, T, T) to, keeping only
    the chosen layers' chosen heads: a long prompt's unchosen layers never stay in memory."""

    def __init__(self, layers: Sequence[int], heads: Sequence[int]):
        super().__init__()
        self._layers, self._heads = set(layers), list(heads)
        self._next_layer = 0

    def append(self, weights: Tensor) -> None:
        if self._next_layer in self._layers:
            super().append(weights[0, self._heads])
        self._next_layer += 1


def chosen(indices: list[int] | None, count: int, field: str) -> list[int]:
    """The layer or head indices asked for (all when None), each checked against the model's count."""
    if indices is None:
        return list(range(count))
    unknown = sorted({i for i in indices if not 0 <= i < count})
    if unknown:
        raise InvalidArgument(f"{field}: {unknown} not in this model's 0..{count - 1}", field=field)
    return sorted(set(indices))


def attention_size(model: Transformer, tokens: int, layers: list[int] | None, heads: list[int] | None
                   ) -> tuple[list[int], list[int], int]:
    """(layers, heads, weights answered) for a prompt of `tokens` tokens."""
    config = model.config
    layers = chosen(layers, config.n_layers, "layers")
    heads = chosen(heads, config.n_heads, "heads")
    return layers, heads, len(layers) * len(heads) * tokens * tokens


def explain_text(model: Transformer, tokenizer: Tokenizer, token_ids: list[int], params: SamplingParams, top_n: int,
                 layers: list[int] | None = None, heads: list[int] | None = None,
                 max_weights: int | None = None) -> TextExplanation:
    """Attention over `token_ids` and the next-token candidates under `params`; TooLarge (naming the
    prompt) when the answer would hold more than `max_weights` attention weights."""
    if len(token_ids) > model.config.max_context:
        raise InvalidArgument(f"prompt is {len(token_ids)} tokens, the model's context holds "
                              f"{model.config.max_context}", field="prompt")
    layers, heads, weights = attention_size(model, len(token_ids), layers, heads)
    if max_weights is not None and weights > max_weights:
        raise TooLarge(f"layers × heads × tokens² = {len(layers)} × {len(heads)} × {len(token_ids)}² = {weights} "
                       f"attention weights, over this service's limit of {max_weights}: send a shorter prompt or "
                       "fewer layers or heads", field="prompt")
    attention = SelectedAttention(layers, heads)
    with torch.inference_mode():
        logits = model(torch.tensor([token_ids], device=model.device), attention)[0, -1]
        next_token = next_token_explanation(logits, params, top_n, tokenizer)
        stacked = torch.stack(list(attention)).float().cpu()
    return TextExplanation(token_ids, [tokenizer.decode([i]) for i in token_ids], layers, heads, stacked, next_token)


def next_token_explanation(logits: Tensor, params: SamplingParams, top_n: int, tokenizer: Tokenizer
                           ) -> NextTokenExplanation:
    """The sampler's own filters, each alone (which tokens it keeps) and together (what it draws from)."""
    order, probabilities, distribution = sampling_distribution(logits, params)
    _, _, top_k_only = sampling_distribution(logits, dataclasses.replace(params, top_p=1.0))
    _, _, top_p_only = sampling_distribution(logits, dataclasses.replace(params, top_k=0))
    top = order[:top_n]
    return NextTokenExplanation(
        token_ids=top.tolist(), tokens=[tokenizer.decode([i]) for i in top.tolist()], logits=logits.float()[top].tolist(), probabilities=probabilities[:top_n].tolist(),
        kept_by_top_k=(top_k_only[:top_n] > 0).tolist(), kept_by_top_p=(top_p_only[:top_n] > 0).tolist(),
        distribution=distribution[:top_n].tolist())
