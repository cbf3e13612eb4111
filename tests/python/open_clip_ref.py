"""Reference outputs of open_clip's CLIP with tiny random weights.

Usage: open_clip_ref.py OUT_DIR [--quick-gelu]
Writes OUT_DIR/weights.safetensors (open_clip state_dict), OUT_DIR/inputs.safetensors
(images, tokens, eot_index) and OUT_DIR/outputs.safetensors (normalised image and text
embeddings, the logit scale), all fp32, computed in eval mode.
"""
import sys

import open_clip
import torch
from safetensors.torch import save_file

EMBED, WIDTH, LAYERS, HEADS, PATCH, IMAGE, CONTEXT, VOCAB = 64, 64, 2, 4, 8, 32, 32, 49408


def main() -> None:
    out = sys.argv[1]
    quick_gelu = "--quick-gelu" in sys.argv
    torch.manual_seed(0)
    model = open_clip.CLIP(
        EMBED,
        vision_cfg=dict(layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH, image_size=IMAGE),
        text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=HEADS, layers=LAYERS),
        quick_gelu=quick_gelu,
    ).eval()
    # Non-trivial norms and biases, so a wrong key or a skipped bias shows in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name != "logit_scale":
                p.add_(0.1 * torch.randn_like(p))
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=CONTEXT)
    texts = ["a red circle on the left", "two blue squares", "a photo of a dog.", "x" * 200, "", "Ünïcödé “quotes” & more!"]
    tokens = tokenizer(texts)
    images = torch.randn(len(texts), 3, IMAGE, IMAGE)
    with torch.no_grad():
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, f"{out}/weights.safetensors")
    save_file({"images": images, "tokens": tokens.long(), "eot_index": tokens.argmax(dim=-1)}, f"{out}/inputs.safetensors")
    save_file({"image_features": image_features, "text_features": text_features}, f"{out}/outputs.safetensors")


if __name__ == "__main__":
    main()
