"""A lossless "direct" latent space that stands in for a VAE in diffusers' WanPipeline.

Instead of a learned autoencoder, a video is rearranged losslessly into latents
(space-to-depth in space, frame stacking in time), in the same causal layout as
Wan's VAE: the first frame alone, then groups of ``temporal_factor`` frames::

    video  (B, 3, 1 + t*(T-1), H, W)     frames  0 | 1..t | t+1..2t | ...
             |  latent frame 0 = frame 0 repeated t times; latent frame i >= 1 = frames (i-1)t+1 .. it
             v  each s x s pixel patch of each stacked frame becomes channels
    latents (B, 3*t*s*s, T, H/s, W/s)    channel index = ((colour * t) + frame_in_group) * s*s + row * s + col

Decoding inverts it exactly (frame 0 is the mean of its t copies). The pipeline
normalises latents with per-channel ``latents_mean`` / ``latents_std`` held in the
config, measured on the training data (see ``toylab.train`` in evals/).

The class exposes what ``WanPipeline`` reads from its ``vae``: ``config.z_dim``,
``config.latents_mean``, ``config.latents_std``, ``config.scale_factor_temporal``,
``config.scale_factor_spatial``, ``temperal_downsample`` (older pipelines derive the
scale factors from it), ``dtype``, ``device`` and ``decode(latents, return_dict=False)``.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

VIDEO_CHANNELS = 3


class PixelShuffleVideoCodec(ModelMixin, ConfigMixin):
    """Lossless space-to-depth + frame-stacking codec with Wan's causal frame layout.

    Args:
        scale_factor_spatial: pixels per latent cell along height and width (s).
        scale_factor_temporal: video frames per latent frame after the first (t).
        latents_mean, latents_std: per-channel statistics (length z_dim = 3*t*s*s)
            used by the pipeline to normalise latents; default 0 and 1.

    Raises:
        ValueError: if a factor is not a positive int, or the statistics do not have
            z_dim entries.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        scale_factor_spatial: int = 4,
        scale_factor_temporal: int = 4,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        z_dim: int | None = None,
        temperal_downsample: list[bool] | None = None,
    ):
        super().__init__()
        for name, value in (("scale_factor_spatial", scale_factor_spatial), ("scale_factor_temporal", scale_factor_temporal)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if scale_factor_temporal & (scale_factor_temporal - 1) or scale_factor_spatial & (scale_factor_spatial - 1):
            raise ValueError(
                f"scale factors must be powers of two (older Wan pipelines read them as 2**n), got "
                f"{scale_factor_spatial=}, {scale_factor_temporal=}"
            )
        expected = VIDEO_CHANNELS * scale_factor_temporal * scale_factor_spatial**2
        if z_dim is not None and z_dim != expected:
            raise ValueError(f"z_dim={z_dim} must equal 3 * t * s * s = {expected} for a lossless codec")
        latents_mean = [0.0] * expected if latents_mean is None else [float(v) for v in latents_mean]
        latents_std = [1.0] * expected if latents_std is None else [float(v) for v in latents_std]
        for name, stats in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if len(stats) != expected:
                raise ValueError(f"{name} has {len(stats)} entries; it needs z_dim = {expected}")
        if min(latents_std) <= 0:
            raise ValueError(f"latents_std must be positive, got min {min(latents_std)}")
        # Wan's VAE marks temporal downsampling per spatial stage; older WanPipeline versions
        # compute the temporal factor as 2**sum(stages) and the spatial one as 2**len(stages).
        n_temporal = scale_factor_temporal.bit_length() - 1
        n_spatial = scale_factor_spatial.bit_length() - 1
        if n_temporal > n_spatial:
            raise ValueError(
                f"scale_factor_temporal={scale_factor_temporal} may not exceed scale_factor_spatial="
                f"{scale_factor_spatial}: Wan's stage list can only express t <= s"
            )
        self.temperal_downsample = [False] * (n_spatial - n_temporal) + [True] * n_temporal
        if temperal_downsample is not None and list(temperal_downsample) != self.temperal_downsample:
            raise ValueError(
                f"temperal_downsample={temperal_downsample} disagrees with the scale factors "
                f"(expected {self.temperal_downsample}); leave it None"
            )
        # diffusers reads these from the config; register the resolved values.
        self.register_to_config(
            z_dim=expected,
            latents_mean=latents_mean,
            latents_std=latents_std,
            temperal_downsample=list(self.temperal_downsample),
        )
        # Buffers give the module a dtype and a device (diffusers reads both from them).
        self.register_buffer("mean", torch.tensor(latents_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(latents_std, dtype=torch.float32), persistent=False)

    # -- geometry ---------------------------------------------------------------------
    def num_latent_frames(self, num_frames: int) -> int:
        """Latent frames for a video of ``num_frames`` frames (which must be 1 + t*k)."""
        t = self.config.scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % t:
            raise ValueError(f"num_frames={num_frames} must be 1 + {t} * k for this codec (e.g. {1 + 4 * t})")
        return (num_frames - 1) // t + 1

    def num_frames(self, num_latent_frames: int) -> int:
        return 1 + self.config.scale_factor_temporal * (num_latent_frames - 1)

    # -- raw (unnormalised) transforms ----------------------------------------------------
    def pack(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1 + t*(T-1), H, W) video -> (B, z_dim, T, H/s, W/s) raw latents."""
        if video.ndim != 5 or video.shape[1] != VIDEO_CHANNELS:
            raise ValueError(f"video must be (B, 3, F, H, W), got {tuple(video.shape)=}")
        s, t = self.config.scale_factor_spatial, self.config.scale_factor_temporal
        b, c, f, h, w = video.shape
        n_latent = self.num_latent_frames(f)
        if h % s or w % s:
            raise ValueError(f"height and width must be multiples of {s}, got {h=} {w=}")
        first = video[:, :, :1].expand(b, c, t, h, w)
        groups = torch.cat([first, video[:, :, 1:]], dim=2)  # (B, 3, t*T, H, W)
        x = groups.reshape(b, c, n_latent, t, h // s, s, w // s, s)
        # -> (B, c, t, s_row, s_col, T, H/s, W/s) so channels are (c, t, row, col)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, c * t * s * s, n_latent, h // s, w // s)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, z_dim, T, h, w) raw latents -> (B, 3, 1 + t*(T-1), h*s, w*s) video."""
        s, t = self.config.scale_factor_spatial, self.config.scale_factor_temporal
        if latents.ndim != 5 or latents.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be (B, {self.config.z_dim}, T, h, w), got {tuple(latents.shape)=}")
        b, _, n_latent, h, w = latents.shape
        x = latents.reshape(b, VIDEO_CHANNELS, t, s, s, n_latent, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, VIDEO_CHANNELS, n_latent * t, h * s, w * s)
        first = x[:, :, :t].mean(dim=2, keepdim=True)
        return torch.cat([first, x[:, :, t:]], dim=2)

    # -- normalised latents, as the diffusion model sees them ---------------------------------
    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return (raw - self.mean.view(shape).to(raw)) / self.std.view(shape).to(raw)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return latents * self.std.view(shape).to(latents) + self.mean.view(shape).to(latents)

    def video_to_latents(self, video: torch.Tensor) -> torch.Tensor:
        """Video in [-1, 1] (B, 3, F, H, W) -> normalised latents (B, z_dim, T, H/s, W/s)."""
        return self.normalize(self.pack(video))

    # -- the VAE interface diffusers uses ----------------------------------------------------
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Raw (unnormalised) latents as a zero-variance distribution, like a VAE's."""
        raw = self.pack(x)
        dist = DiagonalGaussianDistribution(torch.cat([raw, torch.zeros_like(raw)], dim=1), deterministic=True)
        if not return_dict:
            return (dist,)
        return AutoencoderKLOutput(latent_dist=dist)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """Raw latents -> video (B, 3, F, H, W) clamped to [-1, 1]."""
        video = self.unpack(z).clamp(-1.0, 1.0)
        if not return_dict:
            return (video,)
        return DecoderOutput(sample=video)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)
