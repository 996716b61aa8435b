# SPDX-License-Identifier: Apache-2.0
"""MRAD-CLIP's prompted text features over the weights of a Hugging Face `CLIPModel` (paper Sec. 3.5).

AnomalyCLIP-style learnable prompts describe the two states, `[SOT] P_1 ... P_12 object . [EOT]` and `[SOT] P_1 ...
P_12 damaged object . [EOT]`; each context vector P_i gets the image's region-prior bias, and at text layers 2..9
(1-based) the states of tokens 1..4 are replaced by learned *deep* prompts (rounded to fp16 first, as the reference).
A prompt's feature is its end-token state after the final layer norm, times `text_projection`. The text transformer is
causal, so the sequence is cut after the longest prompt's end token instead of CLIP's 77 (same result, ~4x less work).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "causal_attention_mask",
    "prompted_text_features",
    "prompt_texts",
    "prompt_token_ids",
    "OPENAI_DEFAULT_PROMPT_TOKEN_IDS",
]

CONTEXT_PLACEHOLDER = "X"
#: OpenAI's tokenizer on the reference prompts: start 49406, "x" 343 x 12, ("damaged" 13568), "object" 14115, "." 269,
#: end 49407. Used when no tokenizer is at hand (a test checks them against the real vocabulary).
OPENAI_DEFAULT_PROMPT_TOKEN_IDS = (
    [49406] + [343] * 12 + [14115, 269, 49407],
    [49406] + [343] * 12 + [13568, 14115, 269, 49407],
)


def prompt_texts(
    context_length: int, normal_prompt: str = "object", anomaly_prompt: str = "damaged object"
) -> list[str]:
    """The two prompt strings with one placeholder word per context vector, e.g. "X X ... X damaged object."."""
    placeholders = " ".join([CONTEXT_PLACEHOLDER] * context_length)
    return [f"{placeholders} {normal_prompt}.", f"{placeholders} {anomaly_prompt}."]


def prompt_token_ids(
    tokenizer, context_length: int = 12, normal_prompt: str = "object", anomaly_prompt: str = "damaged object"
) -> list[list[int]]:
    """Ids (start ... end token) of the two prompts; refuses a tokenizer that does not give one token per placeholder
    (the context vectors must sit at positions 1..context_length)."""
    ids = [list(tokenizer(text)["input_ids"]) for text in prompt_texts(context_length, normal_prompt, anomaly_prompt)]
    for prompt in ids:
        placeholders = prompt[1 : 1 + context_length]
        if len(set(placeholders)) != 1 or prompt[1 + context_length] == placeholders[0]:
            raise ValueError(
                f"The tokenizer does not encode the placeholder {CONTEXT_PLACEHOLDER!r} as one token each (got {prompt}); "
                "use a CLIP tokenizer."
            )
    return ids


def causal_attention_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (1, 1, T, T) mask: 0 on and below the diagonal, the dtype's minimum above it."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


def prompted_text_features(
    text_model: nn.Module,
    text_projection: nn.Module,
    context: torch.Tensor,
    token_ids: list[list[int]],
    deep_prompts: torch.Tensor | None = None,
    *,
    round_deep_prompts_to_fp16: bool = True,
) -> torch.Tensor:
    """(B, S, P) unnormalised text features of S per-image prompts (S = 2: normal, anomalous).

    `context` (B, S, n_ctx, D): context vectors with their biases, replacing the placeholders 1..n_ctx of `token_ids`
    (`config.prompt_token_ids`, Python ints: the batch is the only free shape, so it exports with a dynamic batch);
    `deep_prompts` (n_deep, t, D) replace tokens 1..t at layers 1..n_deep (0-based).
    """
    batch, states, n_ctx, width = context.shape
    ends = [len(prompt) - 1 for prompt in token_ids]
    length = max(ends) + 1
    padded = [list(prompt) + [0] * (length - len(prompt)) for prompt in token_ids]
    embeddings = text_model.embeddings
    words = embeddings.token_embedding(torch.tensor(padded, device=context.device)).to(context.dtype)  # (S, T, D)
    prefix = words[:, :1].unsqueeze(0).expand(batch, -1, -1, -1)
    suffix = words[:, 1 + n_ctx :].unsqueeze(0).expand(batch, -1, -1, -1)
    hidden = torch.cat([prefix, context, suffix], dim=2).flatten(0, 1)
    hidden = hidden + embeddings.position_embedding.weight[:length].to(hidden.dtype)

    mask = causal_attention_mask(length, hidden.dtype, hidden.device)
    num_deep = 0 if deep_prompts is None else deep_prompts.shape[0]
    for index, layer in enumerate(text_model.encoder.layers):
        if 1 <= index <= num_deep:
            deep = deep_prompts[index - 1]
            if round_deep_prompts_to_fp16:
                deep = deep.half()
            deep = deep.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([hidden[:, :1], deep, hidden[:, 1 + deep.shape[1] :]], dim=1)
        hidden = layer(hidden, attention_mask=mask)
    hidden = text_model.final_layer_norm(hidden).unflatten(0, (batch, states))
    return text_projection(hidden[:, list(range(states)), ends])
