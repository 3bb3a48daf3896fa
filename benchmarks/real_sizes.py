"""The method's models at their real sizes, with random weights, built from configs and saved with save_pretrained.

No weights can be downloaded here, so the memory benchmark builds the architectures the audit uses by default, with
the published configurations' sizes: GIT-large (the captioner), GroundingDINO-tiny and SAM ViT-B (grounding),
Stable Diffusion 1.5's UNet, VAE and CLIP text encoder (inpainting: a 9-channel UNet; InstructPix2Pix: 8 channels;
text-to-image and textual inversion: 4). The embedding tables have the real vocabularies' sizes; the BERT
tokenizer spells its ids as filler words (a random captioner's ids must read as words), the CLIP one is small. Folders are written in float16 to halve the disk; the tools load them in
the precision their settings pick.
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_diffusers import _clip_tokenizer  # a byte-level BPE tokenizer; its size does not matter

BERT_VOCAB = 30522   # bert-base-uncased: GIT's decoder and GroundingDINO's text encoder
CLIP_VOCAB = 49408   # CLIP ViT-L/14's text encoder (Stable Diffusion 1.x)


def _bert_tokenizer(folder: Path):
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase + string.digits + ".,!?-'")
    tokens += ["a", "the", "of", "on", "in", "with", "bird", "water", "land", "boat", "fence", "tree", "sky"]
    tokens += [f"##{c}" for c in string.ascii_lowercase + string.digits]
    tokens = list(dict.fromkeys(tokens))
    tokens += [f"w{i}" for i in range(BERT_VOCAB - len(tokens))]   # every id the decoder samples reads as a word
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True)


def _params_m(model: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 1)


def build_git_large(out: Path) -> float:
    """microsoft/git-large-coco's architecture: CLIP ViT-L/14 at 224 px + a 6-layer BERT-base decoder."""
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tok = _bert_tokenizer(out.parent / f"{out.name}-vocab")
    cfg = GitConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14),
        vocab_size=BERT_VOCAB, hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id)
    model = GitForCausalLM(cfg).eval()
    model.to(torch.float16).save_pretrained(out)
    ip = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    GitProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    return _params_m(model)


def build_grounding_dino_tiny(out: Path) -> float:
    """IDEA-Research/grounding-dino-tiny: Swin-T backbone, BERT-base text encoder, 900 queries (the config's
    defaults), with its image processor (shortest edge 800). Use it with box_threshold 0.9 (below)."""
    from transformers import (GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoImageProcessor,
                              GroundingDinoProcessor)

    tok = _bert_tokenizer(out.parent / f"{out.name}-vocab")
    model = GroundingDinoForObjectDetection(GroundingDinoConfig()).eval()
    # At random weights most of the 900 queries score near 1 for any phrase; a trained detector gives a few boxes.
    # The decoder's output norm scaled by 0.1 makes the query-token logits ~10x smaller: at box_threshold 0.9 a
    # phrase then gets 0 to a few dozen boxes (what SAM decodes), as on real images.
    with torch.no_grad():
        model.model.decoder.layer_norm.weight.mul_(0.1)
        model.model.decoder.layer_norm.bias.mul_(0.1)
    model.save_pretrained(out)   # float32: the Grounder runs GroundingDINO in full precision
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tok).save_pretrained(out)
    return _params_m(model)


def build_sam_vit_b(out: Path) -> float:
    """facebook/sam-vit-base: ViT-B image encoder at 1024 px (SamConfig's defaults), prompt encoder, mask decoder."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    model = SamModel(SamConfig()).eval()
    model.to(torch.float16).save_pretrained(out)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(out)
    return _params_m(model)


def _sd15_components(folder: Path, unet_in_channels: int) -> dict:
    """Stable Diffusion 1.5's UNet (860 M), VAE (84 M) and CLIP text encoder (123 M) configurations."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _clip_tokenizer(folder.parent / f"{folder.name}-tok")
    tok.model_max_length = 77
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=unet_in_channels, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _build_sd(pipeline_class, out: Path, unet_in_channels: int) -> float:
    parts = _sd15_components(out, unet_in_channels)
    pipe = pipeline_class(**parts)
    pipe.to(torch.float16)
    pipe.save_pretrained(out)
    return sum(_params_m(parts[k]) for k in ("unet", "vae", "text_encoder"))


def build_sd15_inpaint(out: Path) -> float:
    from diffusers import StableDiffusionInpaintPipeline

    return _build_sd(StableDiffusionInpaintPipeline, out, 9)


def build_sd15_pix2pix(out: Path) -> float:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return _build_sd(StableDiffusionInstructPix2PixPipeline, out, 8)


def build_sd15(out: Path) -> float:
    from diffusers import StableDiffusionPipeline

    return _build_sd(StableDiffusionPipeline, out, 4)


BUILDERS = {"git": build_git_large, "gdino": build_grounding_dino_tiny, "sam": build_sam_vit_b,
            "inpaint": build_sd15_inpaint, "pix2pix": build_sd15_pix2pix, "sd": build_sd15}


def build_all(folder: Path) -> dict[str, dict]:
    """Every model under `folder` (reused when already built there): {name: {"path", "params_m"}}."""
    index = folder / "models.json"
    built = json.loads(index.read_text()) if index.is_file() else {}
    for name, build in BUILDERS.items():
        if name not in built:
            torch.manual_seed(0)
            built[name] = {"path": str(folder / name), "params_m": build(folder / name)}
            index.write_text(json.dumps(built, indent=1))
    return built


BOX_THRESHOLD = 0.9   # for build_grounding_dino_tiny's detector


def build_world(root: Path, models: Path):
    """Under `root`: a toy-waterbirds at 512 px (2 training images per class), a random ResNet-50 trained one epoch,
    and config.json selecting the real-size models under `models` (built there once); returns (root, None, the
    running loopback LLM: exit it when done), as the tiny world's builder does."""
    from llm_server import LoopbackLLM
    from test_real_backends import answer

    from aspire.data.formats import load_dataset
    from aspire.data.toy.benchmark import write_benchmark
    from aspire.models.classifier import build_classifier, save_checkpoint
    from aspire.models.train import train_classifier

    built = build_all(models)
    write_benchmark("toy-waterbirds", root / "data", seed=0, size_px=512, sizes={"train": 2, "val": 1, "test": 1})
    ds = load_dataset(root / "data")
    clf = build_classifier("resnet50", ds.class_names, input_size=224, seed=0)
    train_classifier(clf, ds.split("train"), [], epochs=1, batch_size=8, lr=0.01, weight_decay=5e-4, seed=0,
                     augment=False, progress=False)
    save_checkpoint(clf, root / "model.pt")
    server = LoopbackLLM([answer] * 2000)
    llm = server.__enter__()
    path = {name: m["path"] for name, m in built.items()}
    config = {
        "holdout": {"fraction": 1.0, "min_per_class": 2, "min_group_images": 0},
        "caption": {"backend": "transformers", "model_id": path["git"], "max_new_tokens": 8},
        "phrases": {"backend": "llm", "base_url": llm.base_url, "api_key": "sk-test", "model": "tiny",
                    "captions_per_call": 1, "max_retries": 0, "backoff_s": 0},
        "ground": {"backend": "transformers", "detector_id": path["gdino"], "segmenter_id": path["sam"],
                   "box_threshold": BOX_THRESHOLD},
        "edit": {"remove_backend": "sd-inpaint", "background_backend": "instruct-pix2pix",
                 "inpaint_model_id": path["inpaint"], "pix2pix_model_id": path["pix2pix"],
                 "num_inference_steps": 1, "working_size_px": 512},
        "probe": {"insertion_images": 1, "joint_images": 1},
        "generate": {"backend": "textual-inversion", "model_id": path["sd"], "train_steps": 1,
                     "train_batch_size": 1, "resolution_px": 512, "seeds": [0], "images_per_seed": 1,
                     "num_inference_steps": 1, "batch_size": 1},
        "augment": {"select": "generic", "filter": False},   # a random classifier's edits rarely flip
    }
    (root / "config.json").write_text(json.dumps(config))
    return root, None, server
