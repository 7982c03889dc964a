"""Tiny diffusers pipelines with random weights, built offline from configs.

Text encoders are left out: tests pass ``prompt_embeds`` (and negative ones for CFG).
"""

from __future__ import annotations

import torch

TEXT_DIM = 32


def tiny_wan_transformer(seed: int = 0, *, layers: int = 3, in_channels: int = 4, heads: int = 2) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16, in_channels=in_channels,
        out_channels=in_channels, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    ).eval()


def tiny_wan_vae(seed: int = 0, z_dim: int = 4):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True],
                            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim).eval()


def tiny_wan_pipeline(seed: int = 0, *, two_transformers: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    kwargs = {}
    if two_transformers:
        kwargs = {"transformer_2": tiny_wan_transformer(seed + 1), "boundary_ratio": 0.5}
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=tiny_wan_transformer(seed),
                       vae=tiny_wan_vae(seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_embeds(batch: int = 1, tokens: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, TEXT_DIM, generator=g)


def run_wan(pipe, *, frames: int = 17, height: int = 64, width: int = 64, steps: int = 3, guidance: float = 1.0,
            batch: int = 1, seed: int = 0):
    """Latents (B, C, F, H, W) of a short generation (VAE decode skipped)."""
    kwargs = dict(prompt_embeds=text_embeds(batch, seed=1))
    if guidance > 1.0:
        kwargs["negative_prompt_embeds"] = text_embeds(batch, seed=2)
    out = pipe(num_frames=frames, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs)
    return out.frames


def tiny_hunyuan_transformer(seed: int = 0, *, text_dim: int = TEXT_DIM) -> torch.nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=text_dim, pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
    ).eval()


def tiny_hunyuan_inputs(seed: int = 0) -> dict:
    """Keyword inputs of :func:`tiny_hunyuan_transformer`: latents (1, 4, 5, 16, 16) -> 5 x 8 x 8
    video tokens, 10 text tokens of which the last 3 are padding."""
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(1, 10, dtype=torch.long)
    text_mask[:, 7:] = 0
    return dict(hidden_states=torch.randn(1, 4, 5, 16, 16, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 10, TEXT_DIM, generator=g), encoder_attention_mask=text_mask,
                pooled_projections=torch.randn(1, 16, generator=g), guidance=torch.tensor([3500.0]),
                return_dict=False)


def tiny_cogvideox_transformer(seed: int = 0, *, version: str = "1.0", in_channels: int = 4) -> torch.nn.Module:
    """CogVideoX-shaped transformer: 1.0 (spatial patches, rotary) or 1.5 (``patch_size_t=2``)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=in_channels, out_channels=4, time_embed_dim=8,
        text_embed_dim=TEXT_DIM, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        patch_size_t=2 if version == "1.5" else None, temporal_compression_ratio=4, max_text_seq_length=8,
        use_rotary_positional_embeddings=True,
    ).eval()


def tiny_cogvideox_pipeline(seed: int = 0, *, version: str = "1.0"):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae,
                             transformer=tiny_cogvideox_transformer(seed, version=version),
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_cogvideox(pipe, *, frames: int = 17, height: int = 128, width: int = 128, steps: int = 3,
                  guidance: float = 1.0, seed: int = 0):
    """Latents of a short CogVideoX generation (VAE decode skipped): 5 x 8 x 8 video tokens (1.5: 3 x 8 x 8)
    after 8 text tokens."""
    kwargs = dict(prompt_embeds=text_embeds(1, seed=1))
    if guidance > 1.0:
        kwargs["negative_prompt_embeds"] = text_embeds(1, seed=2)
    out = pipe(num_frames=frames, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs)
    return out.frames


def tiny_flux_pipeline(seed: int = 0):
    """FLUX-shaped pipeline: 128 x 128 pixels -> 8 x 8 packed image tokens after 8 text tokens."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=2, shift_factor=0.0,
                        scaling_factor=1.0).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_flux(pipe, *, height: int = 128, width: int = 128, steps: int = 3, seed: int = 0):
    """Packed latents of a short FLUX generation (VAE decode skipped)."""
    g = torch.Generator().manual_seed(1)
    out = pipe(prompt_embeds=torch.randn(1, 8, TEXT_DIM, generator=g), pooled_prompt_embeds=torch.randn(1, 16, generator=g),
               height=height, width=width, num_inference_steps=steps, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(seed), output_type="latent")
    return out.images


def tiny_sd_pipeline(seed: int = 0, *, xl: bool = False):
    """Stable Diffusion 1.5-shaped (attention at downsampling 1 and 2) or SDXL-shaped
    (no attention at the first level: 2 and 4) pipeline; 64 x 64 pixels -> 8 x 8 latents."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    torch.manual_seed(seed)
    if xl:
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM,
            attention_head_dim=(2, 4, 4), norm_num_groups=8, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8, use_linear_projection=True,
            transformer_layers_per_block=(1, 1, 1),
        ).eval()
    else:
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
            attention_head_dim=8, norm_num_groups=8,
        ).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=2).eval()
    if xl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1))
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                       scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_sd(pipe, *, height: int = 128, width: int = 128, steps: int = 3, seed: int = 0, xl: bool = False):
    """Latents of a short SD / SDXL generation (16 x 16 latents at 128 x 128 pixels)."""
    g = torch.Generator().manual_seed(1)
    kw = dict(prompt_embeds=torch.randn(1, 8, TEXT_DIM, generator=g),
              negative_prompt_embeds=torch.randn(1, 8, TEXT_DIM, generator=g))
    if xl:
        kw.update(pooled_prompt_embeds=torch.randn(1, 16, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g))
    out = pipe(height=height, width=width, num_inference_steps=steps, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(seed), output_type="latent", **kw)
    return out.images


def save_tiny_sd_with_text_encoder(directory) -> str:
    """A tiny Stable Diffusion pipeline with a tiny CLIP text encoder and a word-level
    tokenizer (built offline), saved with ``save_pretrained`` so ``DiffusionPipeline.
    from_pretrained(directory)`` and ``sparsegen generate --model directory`` load it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    words = "a cat red blue green circle dog grass sitting in tall photograph".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        model_max_length=8)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=8, projection_dim=TEXT_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=0)).eval()
    pipe = tiny_sd_pipeline()
    pipe.register_modules(text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.save_pretrained(directory)
    return str(directory)


def _video_inputs(g, **extra):
    return dict(hidden_states=torch.randn(1, 4, 5, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 6, TEXT_DIM, generator=g),
                timestep=torch.tensor([500]), return_dict=False, **extra)


def tiny_transformer_and_inputs(name: str):
    """(transformer in eval mode, keyword inputs of one forward) for every model family the
    adapters serve. Video models see a 5 x 8 x 8 video token grid (CogVideoX 1.0: 5 x 8 x 8 after
    8 text tokens); FLUX 8 x 8 image tokens after 8 text tokens; Stable Diffusion a 16 x 16 latent."""
    transformer, inputs = _build_tiny(name)
    return transformer.eval(), inputs


def _build_tiny(name: str):
    import diffusers

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    wan_like = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                    text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    if name == "ltx_video":
        t = diffusers.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                                 num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                                                 num_layers=2, caption_channels=32)
        return t, dict(hidden_states=torch.randn(1, 5 * 8 * 8, 8, generator=g),
                       encoder_hidden_states=torch.randn(1, 6, TEXT_DIM, generator=g), timestep=torch.tensor([500]),
                       encoder_attention_mask=torch.ones(1, 6), num_frames=5, height=8, width=8, return_dict=False)
    if name == "mochi":
        t = diffusers.MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                              pooled_projection_dim=16, in_channels=4, out_channels=4, text_embed_dim=32,
                                              time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16)
        valid = torch.ones(2, 6)
        valid[1, 4:] = 0  # the second sample has 4 valid text tokens: Mochi attends each sample separately
        return t, dict(hidden_states=torch.randn(2, 4, 5, 16, 16, generator=g),
                       encoder_hidden_states=torch.randn(2, 6, TEXT_DIM, generator=g), timestep=torch.tensor([500, 500]),
                       encoder_attention_mask=valid, return_dict=False)
    if name == "allegro":
        t = diffusers.AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=24,
                                                in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=48,
                                                caption_channels=32, sample_height=16, sample_width=16, sample_frames=5)
        return t, _video_inputs(g)
    if name == "skyreels_v2":
        return diffusers.SkyReelsV2Transformer3DModel(**wan_like), _video_inputs(g)
    if name == "skyreels_df":  # diffusion forcing: frame-causal blocks of 2 latent frames, 6 x 8 x 8 tokens
        t = diffusers.SkyReelsV2Transformer3DModel(**wan_like, num_frame_per_block=2)
        return t, dict(_video_inputs(g), hidden_states=torch.randn(1, 4, 6, 16, 16, generator=g))
    if name == "wan_vace":
        t = diffusers.WanVACETransformer3DModel(**wan_like, vace_layers=[0], vace_in_channels=8)
        return t, _video_inputs(g, control_hidden_states=torch.randn(1, 8, 5, 16, 16, generator=g))
    if name == "wan":
        return tiny_wan_transformer(), _video_inputs(g)
    if name == "wan_animate":
        # Latents (B, 2C + 4, T + 1, H, W): the reference frame first, then T pose-driven frames.
        t = diffusers.WanAnimateTransformer3DModel(
            **{**wan_like, "in_channels": 12, "out_channels": 4}, latent_channels=4, image_dim=None,
            motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
            motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
            inject_face_latents_blocks=1, motion_encoder_batch_size=4)
        return t, dict(hidden_states=torch.randn(1, 12, 5, 16, 16, generator=g), timestep=torch.tensor([500]),
                       encoder_hidden_states=torch.randn(1, 6, TEXT_DIM, generator=g),
                       pose_hidden_states=torch.randn(1, 4, 4, 16, 16, generator=g),
                       face_pixel_values=torch.randn(1, 3, 4, 16, 16, generator=g), return_dict=False)
    if name == "hunyuan_video":
        return tiny_hunyuan_transformer(), tiny_hunyuan_inputs()
    if name == "cogvideox":
        return tiny_cogvideox_transformer(), dict(hidden_states=torch.randn(1, 5, 4, 16, 16, generator=g),
                                                  encoder_hidden_states=torch.randn(1, 8, TEXT_DIM, generator=g),
                                                  timestep=torch.tensor([500]), return_dict=False)
    if name == "flux":
        pipe = tiny_flux_pipeline()
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
        return pipe.transformer, dict(hidden_states=torch.randn(1, 64, 16, generator=g),
                                      encoder_hidden_states=torch.randn(1, 8, TEXT_DIM, generator=g),
                                      pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                                      img_ids=ids.reshape(64, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    if name == "stable_diffusion":
        return tiny_sd_pipeline().unet, dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([500]),
                                             encoder_hidden_states=torch.randn(1, 8, TEXT_DIM, generator=g),
                                             return_dict=False)
    raise ValueError(f"no tiny model named {name!r}")


def tiny_video_pipeline(name: str):
    """(pipeline, call keyword arguments) of a short generation with a tiny transformer:
    LTX-Video, Mochi and Allegro without a VAE (latents out), SkyReels-V2 text-to-video and
    diffusion forcing (``skyreels_df``: frame-causal blocks of 2 latent frames) with the tiny
    Wan VAE. Two steps, guidance 2 (a CFG batch)."""
    import diffusers

    def embeds(tokens: int = 6, seed: int = 1):
        return torch.randn(1, tokens, TEXT_DIM, generator=torch.Generator().manual_seed(seed))

    with_masks = dict(prompt_embeds=embeds(), prompt_attention_mask=torch.ones(1, 6), negative_prompt_embeds=embeds(seed=2),
                      negative_prompt_attention_mask=torch.ones(1, 6))
    common = dict(num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    if name == "ltx_video":
        pipe = diffusers.LTXPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                     tokenizer=None, transformer=tiny_transformer_and_inputs(name)[0])
        kw = dict(**with_masks, height=256, width=256, num_frames=17)  # 3 x 8 x 8 tokens
    elif name == "mochi":
        pipe = diffusers.MochiPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                       text_encoder=None, tokenizer=None, transformer=tiny_transformer_and_inputs(name)[0])
        kw = dict(**with_masks, height=128, width=128, num_frames=13)  # 3 x 8 x 8
    elif name == "allegro":
        pipe = diffusers.AllegroPipeline(tokenizer=None, text_encoder=None, vae=None,
                                         transformer=tiny_transformer_and_inputs(name)[0],
                                         scheduler=diffusers.EulerAncestralDiscreteScheduler())
        kw = dict(**with_masks, negative_prompt=None, height=128, width=128, num_frames=17)  # 5 x 8 x 8
    elif name in ("skyreels_v2", "skyreels_df"):
        df = name == "skyreels_df"
        cls = diffusers.SkyReelsV2DiffusionForcingPipeline if df else diffusers.SkyReelsV2Pipeline
        scheduler = diffusers.UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
        pipe = cls(tokenizer=None, text_encoder=None, transformer=tiny_transformer_and_inputs("skyreels_v2")[0],
                   vae=tiny_wan_vae(), scheduler=scheduler)
        kw = dict(prompt_embeds=embeds(), negative_prompt_embeds=embeds(seed=2), height=128, width=128, num_frames=13)
        if df:  # 4 latent frames in frame-causal blocks of 2
            kw.update(prompt=None, base_num_frames=13, causal_block_size=2, ar_step=0)
    else:
        raise ValueError(f"no tiny pipeline named {name!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe, {**common, **kw}


def run_pipeline(pipe, kwargs, seed: int = 0) -> torch.Tensor:
    """The latents of ``pipe(**kwargs)`` from a fixed seed."""
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).frames
