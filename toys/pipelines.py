"""Real diffusers pipelines from tiny random components, saved to disk like a downloaded model.

Every builder writes a pipeline directory with ``save_pretrained`` and returns its path; tests
load it back with ``from_pretrained`` (pipeline.loading), the way ``generate --model`` does.
No network: the CLIP tokenizer is built from a hand-written character vocabulary (every
lower-case letter, digit and a little punctuation, alone and as a word end), which tokenizes
any simple English prompt without merges.

- ``save_ddpm`` / ``save_ddim``: unconditional UNet2DModel in pixel space (3 x 8 x 8).
- ``save_stable_diffusion``: UNet2DConditionModel + CLIPTextModel + AutoencoderKL (4 x 8 x 8
  latents, 16 px images), classifier-free guidance.
- ``save_sd3``: SD3Transformer2DModel + two CLIPTextModelWithProjection + a one-block
  AutoencoderKL (4 x 8 x 8 latents, 8 px images), FlowMatchEulerDiscreteScheduler; no T5
  (StableDiffusion3Pipeline feeds zeros in its place when text_encoder_3 is None).
"""

from __future__ import annotations

import string

import torch

CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def tiny_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _clip_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=len(tokenizer), hidden_size=32,
                          intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          max_position_embeddings=tokenizer.model_max_length, **extra)


def _unet2d():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)


def save_ddpm(path: str, seed: int = 0) -> str:
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(seed)
    DDPMPipeline(unet=_unet2d(), scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=False)).save_pretrained(path)
    return path


def save_ddim(path: str, seed: int = 0) -> str:
    from diffusers import DDIMPipeline, DDIMScheduler

    torch.manual_seed(seed)
    DDIMPipeline(unet=_unet2d(), scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False)).save_pretrained(path)
    return path


def save_stable_diffusion(path: str, seed: int = 0) -> str:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4, sample_size=16, scaling_factor=0.5,
    )
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def save_sd3(path: str, seed: int = 0) -> str:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=1,
        sample_size=8, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    tokenizer = tiny_tokenizer()
    encoders = [CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=32)) for _ in range(2)]
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(path)
    return path
