"""Embeddings of an exported CLIP-tiny in open_clip and in transformers.

Usage: export_ref.py OUT_DIR OPEN_CLIP_FILE HF_DIR [--quick-gelu]
Loads OPEN_CLIP_FILE (`braid export --format open_clip`) into `open_clip.CLIP` with strict key
checking and HF_DIR (`braid export --format hf`) with `transformers.CLIPModel.from_pretrained`,
failing on any missing, unexpected or misshapen weight. Writes OUT_DIR/inputs.safetensors
(images, CLIP-BPE tokens, eot_index), OUT_DIR/open_clip.safetensors and OUT_DIR/hf.safetensors
(normalised image and text embeddings), all fp32, computed in eval mode.
"""
import sys

import open_clip
import torch
import transformers
from safetensors.torch import load_file, save_file

EMBED, WIDTH, LAYERS, HEADS, PATCH, IMAGE, CONTEXT, VOCAB = 64, 64, 2, 4, 8, 32, 32, 49408


def features(output) -> torch.Tensor:
    """transformers returns a tensor (4.x) or an output whose pooler_output is projected (5.x)."""
    return output if torch.is_tensor(output) else output.pooler_output


def main() -> None:
    out, open_clip_file, hf_dir = sys.argv[1:4]
    quick_gelu = "--quick-gelu" in sys.argv
    model = open_clip.CLIP(
        EMBED,
        vision_cfg=dict(layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH, image_size=IMAGE),
        text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=HEADS, layers=LAYERS),
        quick_gelu=quick_gelu,
    ).eval()
    model.load_state_dict(load_file(open_clip_file), strict=True)

    hf, info = transformers.CLIPModel.from_pretrained(hf_dir, output_loading_info=True)
    hf = hf.float().eval()
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        sys.exit(f"transformers could not load every weight of {hf_dir}: {problems}")

    torch.manual_seed(0)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=CONTEXT)
    texts = ["a red circle on the left", "two blue squares", "a photo of a dog.", "x" * 200, "", "a small green triangle"]
    tokens = tokenizer(texts).long()
    images = torch.randn(len(texts), 3, IMAGE, IMAGE)
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        reference = {
            "image_features": model.encode_image(images, normalize=True),
            "text_features": model.encode_text(tokens, normalize=True),
        }
        exported = {
            "image_features": normalize(features(hf.get_image_features(pixel_values=images)), dim=-1),
            "text_features": normalize(features(hf.get_text_features(input_ids=tokens)), dim=-1),
        }
    save_file({"images": images, "tokens": tokens, "eot_index": tokens.argmax(dim=-1)}, f"{out}/inputs.safetensors")
    save_file({k: v.contiguous() for k, v in reference.items()}, f"{out}/open_clip.safetensors")
    save_file({k: v.contiguous() for k, v in exported.items()}, f"{out}/hf.safetensors")


if __name__ == "__main__":
    main()
