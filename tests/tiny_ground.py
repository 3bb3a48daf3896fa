"""Tiny random-weight GroundingDINO and SAM, built from config and saved with save_pretrained.

The Grounder loads them back with from_pretrained, so its real loading and inference code runs on CPU in
well under a second. Random weights give arbitrary boxes and masks: tests use thresholds that make the
outcome certain (0.0 keeps every query, 1.0 keeps none) and check shapes, files and mask logic.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

# A word-piece vocabulary that spells any lowercase word (letters and ##letters) plus a few whole words.
_WORDS = ["a", "the", "of", "on", "in", "with", "and", "dog", "cat", "grass", "water", "boat", "bird", "sky",
          "tree", "beach", "man", "woman", "background"]


def write_vocab(folder: Path) -> Path:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(string.ascii_lowercase) + list(string.digits) + list(".,!?-'/")
    tokens += _WORDS + [f"##{c}" for c in string.ascii_lowercase + string.digits]
    unique = list(dict.fromkeys(tokens))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(unique) + "\n", encoding="utf-8")
    return path


def build_tiny_gdino(out_dir: str | Path, seed: int = 0) -> Path:
    """A ~100 KB GroundingDINO (Swin backbone, 1-layer BERT) with its processor, saved in `out_dir`."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    out_dir = Path(out_dir)
    vocab = write_vocab(out_dir / "_vocab")
    tokenizer = BertTokenizer(vocab=str(vocab))
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=64)
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, num_queries=10,
        encoder_layers=1, decoder_layers=2,  # decoder_layers >= 2, else tied bbox_embed weights fail
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, max_text_len=32, use_timm_backbone=False)
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_sam(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny SAM (64 px input, 8x8 embedding, 16 px low-res masks) with its processor, saved in `out_dir`."""
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig)

    out_dir = Path(out_dir)
    # image_embedding_size == image_size / patch_size; prompt hidden_size == vision output_channels
    vision = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=64,
                             num_pos_feats=8)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, image_embedding_size=8,
                                    mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                   iou_head_hidden_dim=16)
    torch.manual_seed(seed)
    config = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    model = SamModel(config).eval()
    image_processor = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                        mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})
    model.save_pretrained(out_dir)
    SamProcessor(image_processor=image_processor).save_pretrained(out_dir)
    return out_dir
