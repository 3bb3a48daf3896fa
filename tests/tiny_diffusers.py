"""Tiny random-weight Stable Diffusion (text-to-image, inpainting, InstructPix2Pix) pipelines, saved with save_pretrained.

Each builder writes a pipeline folder that `from_pretrained` (and so the Editor) loads back. A 2-block VAE
halves the image, so 64x64 images need UNet `sample_size=32`; the inpainting UNet takes 9 input channels
(latents + mask + masked-image latents), the InstructPix2Pix UNet 8 (latents + image latents).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_PX = 64
WORDS = ("a", "photo", "of", "the", "background", "turn", "into", "water", "grass", "land", "sky", "forest")


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _clip_tokenizer(folder: Path):
    """A byte-level BPE CLIP tokenizer whose merges make each of WORDS one token."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for w in WORDS:
        cur = w[0]
        for i, ch in enumerate(w[1:], 1):
            nxt = ch + ("</w>" if i == len(w) - 1 else "")
            if f"{cur} {nxt}" not in merges:
                merges.append(f"{cur} {nxt}")
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=32)


def _components(folder: Path, unet_in_channels: int, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = _clip_tokenizer(folder.parent / f"{folder.name}-tok")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=32, projection_dim=32, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=IMAGE_PX // 2, in_channels=unet_in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=32,
        attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=32, sample_size=IMAGE_PX)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_sd_inpaint(out: Path) -> Path:
    """StableDiffusionInpaintPipeline folder (UNet in_channels=9)."""
    from diffusers import StableDiffusionInpaintPipeline

    StableDiffusionInpaintPipeline(**_components(out, 9)).save_pretrained(out)
    return out


def build_tiny_pix2pix(out: Path) -> Path:
    """StableDiffusionInstructPix2PixPipeline folder (UNet in_channels=8)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    StableDiffusionInstructPix2PixPipeline(**_components(out, 8)).save_pretrained(out)
    return out


def build_tiny_sd(out: Path) -> Path:
    """StableDiffusionPipeline folder (UNet in_channels=4): textual inversion and text-to-image."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**_components(out, 4)).save_pretrained(out)
    return out
