"""Tiny random diffusers models saved with save_pretrained (nothing is downloaded), for the integration tests."""

from __future__ import annotations

from pathlib import Path

import torch

diffusers = __import__("pytest").importorskip("diffusers")

EHS_DIM, POOL_DIM, TOKENS = 16, 8, 5


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Replace every weight by N(0, std^2) (diffusers zero-initialises output layers; tests need a non-trivial net)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_sd3(seed: int = 0) -> torch.nn.Module:
    """SD3 MMDiT on (4, 8, 8) latents: 2 blocks, width 16, text tokens of width 16, pooled width 8."""
    m = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=EHS_DIM, caption_projection_dim=16,
                                        pooled_projection_dim=POOL_DIM, out_channels=4, pos_embed_max_size=16)
    return randomize(m, seed)


def tiny_unet(seed: int = 0, num_class_embeds: int | None = None) -> torch.nn.Module:
    """UNet2DModel on (3, 8, 8) images: two levels (8, 16 channels), attention at the lower one."""
    m = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                              block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                              num_class_embeds=num_class_embeds)
    return randomize(m, seed, std=0.1)


def tiny_dit(seed: int = 0, num_classes: int = 10) -> torch.nn.Module:
    """Class-conditional DiT on (4, 8, 8) latents with learned variance (8 output channels), 2 blocks."""
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes,
                                        norm_num_groups=4)
    return randomize(m, seed, std=0.1)


def tiny_vae(seed: int = 0, latent_channels: int = 4) -> torch.nn.Module:
    """AutoencoderKL with one 8-channel level (no down-sampling): (3, 8, 8) images <-> (4, 8, 8) latents."""
    m = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                                latent_channels=latent_channels, norm_num_groups=4, sample_size=8,
                                scaling_factor=0.5, shift_factor=0.1)
    return randomize(m, seed, std=0.1)


def save_sd3_folder(root: Path, shift: float = 3.0, n_prompts: int = 6, with_vae: bool = False) -> tuple[Path, Path]:
    """(pipeline-like folder with transformer/ + scheduler/ [+ vae/], condition folder with n_prompts rows + null)."""
    from fewstep.integrations.diffusers.conditioning import save_condition_table

    tiny_sd3().save_pretrained(root / "sd3" / "transformer")
    diffusers.FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(root / "sd3" / "scheduler")
    if with_vae:
        tiny_vae().save_pretrained(root / "sd3" / "vae")
    g = torch.Generator().manual_seed(1)
    rows = {"encoder_hidden_states": torch.randn(n_prompts, TOKENS, EHS_DIM, generator=g),
            "pooled_projections": torch.randn(n_prompts, POOL_DIM, generator=g)}
    null = {"encoder_hidden_states": torch.zeros(1, TOKENS, EHS_DIM), "pooled_projections": torch.zeros(1, POOL_DIM)}
    latents = torch.randn(n_prompts, 4, 8, 8, generator=g)  # stand-in data x0 for data-based methods
    cond = save_condition_table(root / "sd3-cond", rows, null, latents=latents, shard_size=4)
    return root / "sd3", cond


def save_latents_folder(root: Path, shape: tuple[int, ...], n: int = 8) -> Path:
    """A condition folder with latents only (data x0 for an unconditional / class-conditional teacher)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    save_file({"latents": torch.randn(n, *shape, generator=torch.Generator().manual_seed(5))},
              str(root / "cond-00000.safetensors"))
    return root


def tiny_flux(seed: int = 0) -> torch.nn.Module:
    """Flux MMDiT with a guidance embedder on (4, 8, 8) latents packed into 16 tokens of 16 channels."""
    m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=EHS_DIM,
                                         pooled_projection_dim=POOL_DIM, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    return randomize(m, seed, std=0.1)


def save_flux_folder(root: Path) -> Path:
    """transformer/ (tiny Flux) + scheduler/ (FlowMatchEuler with resolution-dependent shifting, as Flux ships)."""
    tiny_flux().save_pretrained(root / "flux" / "transformer")
    diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).save_pretrained(root / "flux" / "scheduler")
    return root / "flux"


def save_unet_folder(root: Path, prediction_type: str = "epsilon") -> Path:
    """A DDPMPipeline folder: model_index.json, unet/ + scheduler/ (DDPMScheduler, linear betas, 1000 steps)."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=sched).save_pretrained(root / "ddpm")
    return root / "ddpm"


def save_dit_folder(root: Path) -> Path:
    """transformer/ (class-conditional DiT, learned variance) + scheduler/ (DDPM, linear betas)."""
    tiny_dit().save_pretrained(root / "dit" / "transformer")
    diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(root / "dit" / "scheduler")
    return root / "dit"
