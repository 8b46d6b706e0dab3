"""Prompt cleaning and umT5 encoding, as the official LongCat-Video pipeline feeds its DiT."""

from __future__ import annotations

import html
import re

import torch

from simpletuner_longcat_video import spec

try:  # ftfy repairs mojibake the way upstream does; the host environment ships it
    import ftfy
except ImportError:  # pragma: no cover - cleaning still unescapes and normalises whitespace
    ftfy = None


def clean_prompt(text: str) -> str:
    """Upstream's prompt cleaning: repair text, unescape HTML twice, collapse whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder, prompts: list[str], *, device: torch.device | str, max_tokens: int = spec.TEXT_MAX_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``prompts`` to ``([B, max_tokens, C], [B, max_tokens])``; padded positions are zero.

    The valid-length mask travels with the states so the DiT can exclude padding exactly.
    """
    tokens = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=max_tokens,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids = tokens.input_ids.to(device)
    mask = tokens.attention_mask.to(device)
    states = text_encoder(ids, mask).last_hidden_state
    states = states * mask.unsqueeze(-1).to(states.dtype)
    return states, mask
