"""Writes an ImageFolder fixture from real Fashion-MNIST images, for `sgr bench data`.

usage: make_imagefolder.py IDX_DIR OUT PER_CLASS_TRAIN PER_CLASS_VAL [WIDTH HEIGHT]

Each 28x28 image is upscaled (bicubic) to WIDTH x HEIGHT (default 500x375, a typical ImageNet
photo size), tinted into RGB and saved as JPEG (quality 90) under OUT/{train,val}/<class>/.
"""
import gzip
import os
import sys

from PIL import Image

NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return shape, raw[4 + 4 * dims:]


def main():
    idx_dir, out, n_train, n_val = sys.argv[1:5]
    w, h = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (500, 375)
    n_train, n_val = int(n_train), int(n_val)
    (n, rows, cols), pixels = read_idx(os.path.join(idx_dir, "train-images-idx3-ubyte.gz"))
    _, labels = read_idx(os.path.join(idx_dir, "train-labels-idx1-ubyte.gz"))
    seen = [0] * 10
    for i in range(n):
        y = labels[i]
        k = seen[y]
        seen[y] += 1
        if k >= n_train + n_val:
            if min(seen) >= n_train + n_val:
                break
            continue
        split = "train" if k < n_train else "val"
        grey = Image.frombytes("L", (cols, rows), pixels[i * rows * cols:(i + 1) * rows * cols])
        big = grey.resize((w, h), Image.BICUBIC)
        rgb = Image.merge("RGB", (big, big.point(lambda v: v // 2 + 64), big.point(lambda v: 255 - v)))
        d = os.path.join(out, split, NAMES[y])
        os.makedirs(d, exist_ok=True)
        rgb.save(os.path.join(d, f"{k:05d}.jpg"), quality=90)


if __name__ == "__main__":
    main()
