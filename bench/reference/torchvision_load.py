"""Loads an sgr checkpoint of an ImageNet ResNet into torchvision with strict=True.

usage: torchvision_load.py WEIGHTS DEPTH CLASSES INPUT OUTPUT

WEIGHTS: safetensors of every variable of an sgr SplitNet (auxiliary heads `aux.*` are
dropped: torchvision has none). BatchNorm's `num_batches_tracked` counters, which tch does not
keep, are added as 0; every other key must match torchvision's `resnet{DEPTH}` exactly
(`load_state_dict(strict=True)` raises otherwise). INPUT holds `images`; OUTPUT receives the
model's eval-mode `logits` for them, for the Rust side to compare with its own forward.
"""
import sys

import torch
import torchvision

import st


def main():
    weights, depth, classes, inp, out = sys.argv[1:]
    tensors, _ = st.load(weights)
    state = {k: v for k, v in tensors.items() if not k.startswith("aux.")}
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=int(classes))
    for name, _ in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0, dtype=torch.long)
    model.load_state_dict(state, strict=True)
    model.eval()
    images = st.load(inp)[0]["images"]
    with torch.no_grad():
        logits = model(images)
    st.save(out, {"logits": logits.contiguous()})


if __name__ == "__main__":
    main()
