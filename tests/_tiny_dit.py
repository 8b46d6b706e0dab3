"""The tiny LoRA DiT and the one-step image-to-video batch that the in-process step comparisons share.

The transformer is imported when a model is built, not at import: the block-sparse tests set
``TRITON_INTERPRET`` in their workers before anything imports the kernels.
"""

from __future__ import annotations

import torch

TINY = dict(hidden_size=64, depth=2, num_heads=4, caption_channels=32, adaln_tembed_dim=32, frequency_embedding_size=32)


def lora_dit(seed: int = 0, **overrides: object) -> torch.nn.Module:
    """The tiny DiT (``TINY`` with ``overrides``), frozen, with a rank-4 LoRA that starts non-zero."""
    from peft import LoraConfig

    from simpletuner_longcat_video.core.transformer import LORA_TARGET_MODULES, LongCatVideoTransformer3DModel

    torch.manual_seed(seed)
    model = LongCatVideoTransformer3DModel(**{**TINY, **overrides})
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(LORA_TARGET_MODULES), init_lora_weights=False))
    return model


def i2v_batch(seed: int = 1) -> tuple[torch.Tensor, ...]:
    """(latents, timesteps, text, mask, target): 3 latent frames, the first the clean condition."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 3, 8, 8, generator=gen)
    timesteps = torch.tensor([[0.0, 700.0, 700.0]])
    text = torch.randn(1, 1, 6, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    target = torch.randn(1, 16, 2, 8, 8, generator=gen)
    return latents, timesteps, text, mask, target


def i2v_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and the flow-matching loss on the noisy frames of ``batch``."""
    latents, timesteps, text, mask, target = batch
    out = model(latents, timesteps, text, mask, num_cond_latents=1, return_dict=False)[0]
    return out, torch.nn.functional.mse_loss(out[:, :, 1:], target)


def take_lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters' gradients, copied; the model's are cleared for the next step."""
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads
