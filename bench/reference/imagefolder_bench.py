"""torchvision's ImageFolder + DataLoader throughput, the baseline of `sgr bench data`.

usage: imagefolder_bench.py DATA_DIR WORKERS BATCH_SIZE IMAGE_SIZE BATCHES

Same work as sgr's training batches: decode, RandomResizedCrop(IMAGE_SIZE) with torchvision's
defaults (scale 0.08-1, ratio 3/4-4/3, bilinear with antialias), horizontal flip p = 0.5,
ToTensor, Normalize(ImageNet mean/std), shuffled, in batches of BATCH_SIZE; WORKERS loader
processes (prefetch_factor 2, as sgr's queue of 2 per worker). Prints one JSON line: images
and seconds from the start of iteration to the last batch (worker start-up included, as for
sgr's threads).
"""
import json
import sys
import time

import torch
import torchvision
from torchvision import transforms


def main():
    data_dir, workers, batch_size, size, batches = sys.argv[1:]
    workers, batch_size, size, batches = int(workers), int(batch_size), int(size), int(batches)
    torch.set_num_threads(1)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    ds = torchvision.datasets.ImageFolder(f"{data_dir}/train", transform=tf)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, num_workers=workers, prefetch_factor=2,
        generator=torch.Generator().manual_seed(0),
    )
    start = time.perf_counter()
    images = 0
    for i, (x, _) in enumerate(loader):
        images += x.shape[0]
        if i + 1 == batches:
            break
    seconds = time.perf_counter() - start
    print(json.dumps({"workers": workers, "images": images, "seconds": seconds,
                      "images_per_second": images / seconds}))


if __name__ == "__main__":
    main()
