"""TAEF2: the tiny autoencoder of the FLUX.2 latent space, as a diffusers model.

TAEF2 (madebyollin's TAESD family, MIT licence) is diffusers' ``AutoencoderTiny`` layout --
``EncoderTiny``/``DecoderTiny`` built from ``AutoencoderTinyBlock`` -- with 32 latent channels
and one addition: in the deepest blocks (reference encoder layers 11-13, reference decoder layers
3-5) a residual branch

    pool = Conv1x1(64 -> 256, no bias), GroupNorm(4, 256), ReLU, Conv1x1(256 -> 64, no bias)
    x = x + pool(x)                       before the block's own convolutions.

Stock ``AutoencoderTiny(latent_channels=32)`` has no ``pool`` and loads the released weights only
with ``strict=False`` (24 unexpected keys): a silently different model. ``TAEF2`` builds the
right one and loads the released ``taef2_encoder.pth``/``taef2_decoder.pth`` strictly.

It is a real diffusers model (``ModelMixin`` + ``ConfigMixin``): ``save_pretrained`` /
``from_pretrained`` work, and a pipeline that holds one as its ``vae`` names it in
``model_index.json`` as ``["spellshield.indexing.taef2", "TAEF2"]``, which diffusers imports on load.
``encode`` takes images in [-1, 1] and returns ``.latents`` (raw, unscaled); ``decode`` returns
``.sample`` in about [-1, 1], exactly as ``AutoencoderTiny``.
"""

from __future__ import annotations

import os

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DecoderTiny, EncoderTiny
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from torch import nn

ENCODER_FILE = "taef2_encoder.pth"
DECODER_FILE = "taef2_decoder.pth"


class PooledTinyBlock(AutoencoderTinyBlock):
    """``AutoencoderTinyBlock`` preceded by TAEF2's residual GroupNorm branch ``x + pool(x)``."""

    def __init__(self, channels: int, act_fn: str = "relu", expansion: int = 4, groups: int = 4):
        super().__init__(channels, channels, act_fn)
        hidden = channels * expansion
        self.pool = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=False),
            nn.GroupNorm(groups, hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + self.pool(x))


def _add_pools(layers: nn.Sequential, positions, channels: int, act_fn: str, expansion: int, groups: int) -> None:
    for position in positions:
        if not isinstance(layers[position], AutoencoderTinyBlock):
            raise ValueError(f"layer {position} is {type(layers[position]).__name__}, not an AutoencoderTinyBlock")
        layers[position] = PooledTinyBlock(channels, act_fn, expansion, groups)


class TAEF2(ModelMixin, ConfigMixin):
    """Tiny autoencoder with TAEF2's pooled blocks; defaults are the released TAEF2 model."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 32,
        block_out_channels: int = 64,
        act_fn: str = "relu",
        upsample_fn: str = "nearest",
        num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3),
        num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1),
        encoder_pooled_layers: tuple[int, ...] = (11, 12, 13),
        decoder_pooled_layers: tuple[int, ...] = (2, 3, 4),  # reference layers 3-5: its layer 0 is the clamp
        pool_expansion: int = 4,
        pool_groups: int = 4,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        force_upcast: bool = False,
    ):
        super().__init__()
        widths = (block_out_channels,) * len(num_encoder_blocks)
        self.encoder = EncoderTiny(in_channels, latent_channels, tuple(num_encoder_blocks), widths, act_fn)
        self.decoder = DecoderTiny(latent_channels, out_channels, tuple(num_decoder_blocks),
                                   (block_out_channels,) * len(num_decoder_blocks), 2, act_fn, upsample_fn)
        _add_pools(self.encoder.layers, encoder_pooled_layers, block_out_channels, act_fn, pool_expansion, pool_groups)
        _add_pools(self.decoder.layers, decoder_pooled_layers, block_out_channels, act_fn, pool_expansion, pool_groups)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images in [-1, 1] (B, 3, H, W) -> raw latents (B, 32, H/8, W/8) in ``.latents``."""
        latents = self.encoder(x)  # EncoderTiny maps [-1, 1] to the reference's [0, 1] itself
        return AutoencoderTinyOutput(latents=latents) if return_dict else (latents,)

    def decode(self, z: torch.Tensor, generator=None, return_dict: bool = True):
        """Raw latents -> images in about [-1, 1] in ``.sample`` (DecoderTiny clamps its input)."""
        sample = self.decoder(z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        decoded = self.decode(self.encode(sample).latents).sample
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    @classmethod
    def from_pth(cls, directory: str) -> "TAEF2":
        """The released weights (``taef2_encoder.pth``, ``taef2_decoder.pth``), loaded strictly, float32."""
        model = cls()
        state = released_state_dict(directory)
        # strict: a missing or unexpected key (e.g. a model without the pool branch) is an error
        model.load_state_dict(state, strict=True)
        return model.eval()


def is_released_weights_dir(path: str) -> bool:
    """A directory holding the released TAEF2 ``.pth`` state dicts (not a save_pretrained one)."""
    return os.path.isfile(os.path.join(path, ENCODER_FILE)) and os.path.isfile(os.path.join(path, DECODER_FILE))


def released_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """The released state dicts under this model's parameter names, in their stored dtype.

    Reference encoder layer ``i`` is ``encoder.layers.i``; reference decoder layer ``i`` is
    ``decoder.layers.(i-1)`` because the reference decoder's layer 0 is the clamp that
    ``DecoderTiny.forward`` applies itself.
    """
    if not is_released_weights_dir(directory):
        raise ValueError(f"{directory} holds no {ENCODER_FILE} and {DECODER_FILE}")
    state: dict[str, torch.Tensor] = {}
    encoder = torch.load(os.path.join(directory, ENCODER_FILE), map_location="cpu", weights_only=True)
    for key, tensor in encoder.items():
        state[f"encoder.layers.{key}"] = tensor
    decoder = torch.load(os.path.join(directory, DECODER_FILE), map_location="cpu", weights_only=True)
    for key, tensor in decoder.items():
        layer, rest = key.split(".", 1)
        if int(layer) == 0:
            raise ValueError(f"{DECODER_FILE}: unexpected parameter {key!r} on the clamp layer")
        state[f"decoder.layers.{int(layer) - 1}.{rest}"] = tensor
    return state
