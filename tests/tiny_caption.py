"""Tiny random-weight captioning models (GIT, BLIP, BLIP-2) built from config and saved with save_pretrained.

Each builder writes a model + processor folder that `from_pretrained` (and so the Captioner) loads back.
Hidden size 32, 1-2 layers, 32x32 images: a generate call takes milliseconds on CPU. Large initial weights
(initializer_range) make the captions depend on the image, so a caption given to the wrong image shows.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

IMAGE_PX = 32


def _bert_tokenizer(folder: Path):
    """A BERT word-piece tokenizer over a few dozen tokens (transformers 5 ignores vocab_file=; use vocab=)."""
    from transformers import BertTokenizer

    toks = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    toks += list(string.ascii_lowercase) + list(string.digits) + list(".,!?-'")
    toks += ["a", "photo", "of", "dog", "cat", "on", "the", "grass", "water", "bird", "sky", "tree", "in", "with"]
    toks += [f"##{c}" for c in string.ascii_lowercase]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(dict.fromkeys(toks)) + "\n", encoding="utf-8")
    return BertTokenizer(vocab=str(vocab), do_lower_case=True)


def build_tiny_git(out: Path) -> Path:
    """GIT: a CLIP-style vision tower + a BERT-style decoder; CLIP image processor, BERT tokenizer."""
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    torch.manual_seed(0)
    tok = _bert_tokenizer(out.parent / f"{out.name}-vocab")
    ip = CLIPImageProcessor(size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX})
    cfg = GitConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=IMAGE_PX, patch_size=8, initializer_range=1.0),
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, initializer_range=0.5, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    GitForCausalLM(cfg).eval().save_pretrained(out)
    GitProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    return out


def build_tiny_blip(out: Path) -> Path:
    """BLIP captioning: ViT encoder + BERT decoder; bos/eos/pad/sep set to the tiny tokenizer's ids."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    torch.manual_seed(0)
    tok = _bert_tokenizer(out.parent / f"{out.name}-vocab")
    ip = BlipImageProcessor(size={"height": IMAGE_PX, "width": IMAGE_PX})
    cfg = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=IMAGE_PX, patch_size=8, initializer_range=1.0),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=128, initializer_range=0.5,
                         bos_token_id=tok.cls_token_id,
                         sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id),
        projection_dim=32, image_text_hidden_size=32)
    BlipForConditionalGeneration(cfg).eval().save_pretrained(out)
    BlipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    return out


def build_tiny_blip2(out: Path, num_query_tokens: int = 4) -> Path:
    """BLIP-2: ViT + Q-Former + OPT; the processor adds an <image> token whose id the config must know."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    torch.manual_seed(0)
    tok = _bert_tokenizer(out.parent / f"{out.name}-vocab")
    ip = BlipImageProcessor(size={"height": IMAGE_PX, "width": IMAGE_PX})
    proc = Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=num_query_tokens)  # adds <image>
    vocab_size = len(tok)
    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=IMAGE_PX, patch_size=8,
                                        initializer_range=1.0).to_dict(),
        qformer_config=Blip2QFormerConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=4, intermediate_size=64,
                                          encoder_hidden_size=32, initializer_range=0.5).to_dict(),
        text_config=OPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                              num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                              init_std=0.5,
                              bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                              pad_token_id=tok.pad_token_id).to_dict(),
        num_query_tokens=num_query_tokens, image_token_index=tok.convert_tokens_to_ids("<image>"),
        initializer_range=0.5)
    Blip2ForConditionalGeneration(cfg).eval().save_pretrained(out)
    proc.save_pretrained(out)
    return out
