"""CIFAR ResNet (6n+2) as an ordered list of units, cut into K modules with a head each.

Variable names follow torchvision / the Rust side: `conv1`, `bn1`, `layer{s}.{i}.{conv1,bn1,conv2,bn2}`,
`layer{s}.{i}.downsample.{0,1}`, `fc`, auxiliary heads `aux.{u}.*` (u = last unit of the module).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTHS = (16, 32, 64)
MLP_HIDDEN = 128
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def bn(c):
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM, affine=True)


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = bn(c_out)
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), bn(c_out)
            )
        else:
            self.downsample = None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.downsample is None else self.downsample(x)
        return F.relu(out + sc)


def pool(h):
    return h.mean(dim=(2, 3))


class Head(nn.Module):
    """Auxiliary head: `conv` (conv3x3-bn-relu-pool-fc), `linear` (pool-fc), `mlp` (pool-fc1-relu-fc2)."""

    def __init__(self, kind, c, classes):
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn = bn(c)
            self.fc = nn.Linear(c, classes)
        elif kind == "linear":
            self.fc = nn.Linear(c, classes)
        elif kind == "mlp":
            self.fc1 = nn.Linear(c, MLP_HIDDEN)
            self.fc2 = nn.Linear(MLP_HIDDEN, classes)
        else:
            raise ValueError(f"unknown head kind {kind!r} (conv|linear|mlp)")

    def forward(self, h):
        if self.kind == "conv":
            return self.fc(pool(F.relu(self.bn(self.conv(h)))))
        if self.kind == "linear":
            return self.fc(pool(h))
        return self.fc2(F.relu(self.fc1(pool(h))))


# ---------------------------------------------------------------------------------------------
# Local losses (--local-loss): InfoPro (Wang et al., ICLR 2021) and PredSim (Nokland & Eidnes,
# ICML 2019), written from the papers' definitions in plain PyTorch. Their layers live in the
# head's namespace: `aux.{u}.decoder.*` and `aux.{u}.sim.*`.

CONTRAST_DIM = 128
BASE_TEMPERATURE = 0.07


class Decoder(nn.Module):
    """InfoPro's reconstruction: upsample to the image (bilinear, corners aligned), conv3x3 to
    12 channels, BN, ReLU, conv3x3 to the image channels, sigmoid; BCE against the image in [0, 1]."""

    def __init__(self, c, image_channels, size):
        super().__init__()
        self.size = size
        self.conv1 = nn.Conv2d(c, 12, 3, padding=1)
        self.bn = bn(12)
        self.conv2 = nn.Conv2d(12, image_channels, 3, padding=1)

    def forward(self, h, image01):
        up = F.interpolate(h, size=self.size, mode="bilinear", align_corners=True)
        recon = torch.sigmoid(self.conv2(F.relu(self.bn(self.conv1(up)))))
        return F.binary_cross_entropy(recon, image01)


class SimProjection(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, h):
        return self.conv(h)


def similarity_matrix(x):
    """PredSim's adjusted cosine similarity: maps with more than 3 channels and more than one
    row are reduced to the per-channel standard deviation over positions."""
    if x.dim() == 4:
        if x.size(1) > 3 and x.size(2) > 1:
            x = x.view(x.size(0), x.size(1), -1).std(dim=2)
        else:
            x = x.view(x.size(0), -1)
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (1e-8 + xc.pow(2).sum(dim=1, keepdim=True).sqrt())
    return (xn @ xn.t()).clamp(-1, 1)


def supervised_contrastive(features, y, temperature):
    """Supervised contrastive loss, one view: anchors against all other samples, positives the
    other samples of the same class, -(tau / 0.07) * mean over anchors."""
    z = F.normalize(features, dim=1)
    logits = z @ z.t() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    b = z.size(0)
    not_self = 1 - torch.eye(b, dtype=z.dtype, device=z.device)
    positives = (y.view(-1, 1) == y.view(1, -1)).to(z.dtype) * not_self
    log_prob = logits - torch.log((logits.exp() * not_self).sum(dim=1, keepdim=True))
    counts = positives.sum(dim=1)
    counts = torch.where(counts == 0, torch.ones_like(counts), counts)
    mean_log_prob_pos = (positives * log_prob).sum(dim=1) / counts
    return -(temperature / BASE_TEMPERATURE) * mean_log_prob_pos.mean()


class LocalLoss:
    """Settings of the local loss; `weights(k, K)` is InfoPro's linear (lambda1, lambda2)."""

    def __init__(self, cfg):
        self.kind = cfg.get("local_loss", "ce")
        self.recon = cfg.get("infopro_recon_weights") or [6.0, 1.0]
        self.cls = cfg.get("infopro_class_weights") or [0.0, 2.0]
        self.contrast = cfg.get("infopro_class", "softmax") == "contrast"
        self.temperature = float(cfg.get("infopro_temperature", 0.07))
        self.beta = float(cfg.get("predsim_beta", 0.99))
        self.mean = cfg.get("input_mean") or []
        self.std = cfg.get("input_std") or []
        self.smoothing = float(cfg.get("label_smoothing", 0.0))
        if self.kind not in ("ce", "infopro", "predsim"):
            raise ValueError(f"unknown local_loss {self.kind!r}")

    def weights(self, k, K):
        r = k / (K - 2) if K > 2 else 0.0
        return (self.recon[0] * (1 - r) + self.recon[1] * r,
                self.cls[0] * (1 - r) + self.cls[1] * r)

    def restore(self, x):
        if self.mean:
            c = x.size(1)
            x = x * torch.tensor(self.std, dtype=x.dtype).view(1, c, 1, 1) + \
                torch.tensor(self.mean, dtype=x.dtype).view(1, c, 1, 1)
        return x.clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Splits


def depth_of(model):
    if not model.startswith("resnet"):
        raise ValueError(f"unknown model {model!r}")
    depth = int(model[len("resnet") :])
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet depth must be 6n+2, got {depth}")
    return depth


def blocks_per_stage(model):
    return (depth_of(model) - 2) // 6


def num_units(model):
    return 3 * blocks_per_stage(model) + 1


# InfoPro split tables: cut [stage, block] = "after that unit"; "even" = even by unit count.
TABLES = {
    "resnet32": {
        1: [],
        2: [[2, 1]],
        3: [[1, 4], [2, 4]],
        4: [[1, 2], [2, 1], [3, 0]],
        8: [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]],
        16: "even",
    },
    "resnet110": {
        1: [],
        2: [[2, 8]],
        3: [[1, 17], [2, 17]],
        4: [[1, 11], [2, 7], [3, 3]],
        8: [[1, 4], [1, 11], [2, 0], [2, 7], [2, 14], [3, 3], [3, 10]],
        16: [[1, 1], [1, 4], [1, 7], [1, 10], [1, 13], [1, 16], [2, 1], [2, 4], [2, 7],
             [2, 11], [2, 15], [3, 1], [3, 5], [3, 9], [3, 13]],
        32: "even",
        55: "even",
    },
    "resnet20": {k: "even" for k in (1, 2, 4, 5, 10)},
    "resnet56": {k: "even" for k in (1, 2, 4, 7, 14, 28)},
}


def even_ranges(units, k):
    """Module i has base+1 units iff i >= k - extra (larger modules last)."""
    if not 1 <= k <= units:
        raise ValueError(f"cannot split {units} units into {k} modules")
    base, extra = divmod(units, k)
    ranges, start = [], 0
    for i in range(k):
        size = base + (1 if i >= k - extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges


def cut_ranges(model, cuts):
    n = blocks_per_stage(model)
    units = num_units(model)
    ends = []
    for stage, block in cuts:
        flat = 0 if (stage, block) == (0, 0) else 1 + (stage - 1) * n + block
        ends.append(flat + 1)
    ends.append(units)
    ranges, start = [], 0
    for e in ends:
        ranges.append((start, e))
        start = e
    return ranges


def table_ranges(model, k):
    table = TABLES.get(model)
    if table is None or k not in table:
        raise ValueError(f"no split table for {model} K={k}; pass module_ranges explicitly")
    entry = table[k]
    if entry == "even":
        return even_ranges(num_units(model), k)
    return cut_ranges(model, entry)


def validate_ranges(ranges, units):
    ranges = [(int(a), int(b)) for a, b in ranges]
    start = 0
    for a, b in ranges:
        if a != start or b <= a:
            raise ValueError(f"module ranges {ranges} must tile 0..{units} contiguously")
        start = b
    if start != units:
        raise ValueError(f"module ranges {ranges} must end at {units}")
    return ranges


# ---------------------------------------------------------------------------------------------
# The network


class SplitNet(nn.Module):
    def __init__(self, model, in_channels, classes, ranges, head="conv", loss=None, size=32):
        super().__init__()
        self.loss = loss or LocalLoss({})
        n = blocks_per_stage(model)
        units = num_units(model)
        self.ranges = validate_ranges(ranges, units)
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = bn(WIDTHS[0])
        unit_out = [WIDTHS[0]]
        blocks = []
        c_in = WIDTHS[0]
        for s, w in enumerate(WIDTHS, start=1):
            stage = []
            for i in range(n):
                stride = 2 if (i == 0 and s > 1) else 1
                stage.append(BasicBlock(c_in, w, stride))
                c_in = w
                unit_out.append(w)
            setattr(self, f"layer{s}", nn.Sequential(*stage))
            blocks.extend(stage)
        self.fc = nn.Linear(WIDTHS[-1], classes)
        self.aux = nn.ModuleDict()
        outputs = CONTRAST_DIM if self.loss.kind == "infopro" and self.loss.contrast else classes
        for a, b in self.ranges[:-1]:
            aux = Head(head, unit_out[b - 1], outputs)
            if self.loss.kind == "infopro":
                aux.decoder = Decoder(unit_out[b - 1], in_channels, (size, size))
            elif self.loss.kind == "predsim":
                aux.sim = SimProjection(unit_out[b - 1])
            self.aux[str(b - 1)] = aux
        self.classes = classes
        self._units = [self._stem] + blocks  # plain list: the blocks are registered above

    def _stem(self, x):
        return F.relu(self.bn1(self.conv1(x)))

    @property
    def K(self):
        return len(self.ranges)

    def forward_module(self, k, h):
        a, b = self.ranges[k]
        for u in range(a, b):
            h = self._units[u](h)
        return h

    def head_logits(self, k, h):
        if k == self.K - 1:
            return self.fc(pool(h))
        return self.aux[str(self.ranges[k][1] - 1)](h)

    def forward(self, x):
        for k in range(self.K):
            x = self.forward_module(k, x)
        return self.head_logits(self.K - 1, x)

    def local_loss(self, k, h, x, y):
        """Module k's training loss on its output h (x: the step's input images). The last
        module always trains on cross-entropy."""
        out = self.head_logits(k, h)
        ce = lambda z: F.cross_entropy(z, y, label_smoothing=self.loss.smoothing)  # noqa: E731
        if k == self.K - 1 or self.loss.kind == "ce":
            return ce(out)
        aux = self.aux[str(self.ranges[k][1] - 1)]
        if self.loss.kind == "infopro":
            l1, l2 = self.loss.weights(k, self.K)
            recon = aux.decoder(h, self.loss.restore(x))
            if self.loss.contrast:
                cls = supervised_contrastive(out, y, self.loss.temperature)
            else:
                cls = ce(out)
            return l1 * recon + l2 * cls
        onehot = F.one_hot(y, self.classes).to(h.dtype)
        sim = F.mse_loss(similarity_matrix(aux.sim(h)), similarity_matrix(onehot))
        return (1 - self.loss.beta) * ce(out) + self.loss.beta * sim

    def exported_state(self):
        """Every variable except `num_batches_tracked` (the Rust side has none)."""
        return {
            name: t
            for name, t in self.state_dict().items()
            if not name.endswith("num_batches_tracked")
        }

    def load_exported(self, tensors):
        """Loads every variable; strict except for `num_batches_tracked`. Casts to our dtype."""
        own = self.state_dict()
        expected = {n for n in own if not n.endswith("num_batches_tracked")}
        missing = sorted(expected - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise KeyError(f"weights mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
        with torch.no_grad():
            for name in expected:
                dst, src = own[name], tensors[name]
                if tuple(dst.shape) != tuple(src.shape):
                    raise ValueError(f"{name}: shape {tuple(src.shape)} != model {tuple(dst.shape)}")
                dst.copy_(src.to(dst.dtype))


# ---------------------------------------------------------------------------------------------
# Vision Transformers (pre-norm, timm names), cut at block boundaries: unit 0 is the patch
# embedding, units 1..depth the blocks. Written out like the Rust side (matmul-softmax-matmul
# attention, exact GELU, LayerNorm eps 1e-6).

VIT_SIZES = {"micro": (6, 128, 4), "tiny": (12, 192, 3), "small": (12, 384, 6)}
LN_EPS = 1e-6


def vit_dims(model):
    """(depth, dim, heads) of vit-micro/tiny/small or vit-DxWhH."""
    name = model[len("vit-"):]
    if name in VIT_SIZES:
        return VIT_SIZES[name]
    d, rest = name.split("x")
    w, h = rest.split("h")
    return int(d), int(w), int(h)


def vit_ranges(depth, k):
    """The Rust split table: K dividing the depth gets depth/K blocks per module (the patch
    embedding rides with the first); other K are even by unit count."""
    if depth % k:
        return even_ranges(depth + 1, k)
    ends = [1 + i * depth // k for i in range(1, k)] + [depth + 1]
    ranges, start = [], 0
    for e in ends:
        ranges.append((start, e))
        start = e
    return ranges


def default_patch(size):
    for p in (4, 8, 16):
        if size % p == 0 and (size // p) ** 2 <= 196:
            return p
    raise ValueError(f"no default patch size for {size} px")


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        probs = ((q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((probs @ v).transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, c, dim, patch, tokens, cls):
        super().__init__()
        self.proj = nn.Conv2d(c, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls else None
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))

    def forward(self, x):
        h = self.proj(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1)
        return h + self.pos_embed


def token_pool(h, cls):
    return h[:, 0] if cls else h.mean(1)


class TokenHead(nn.Module):
    """Token heads: `linear` (pool-LN-fc), `mlp` (pool-LN-fc1-relu-fc2), `block` (block, then
    pool-LN-fc); the block head has max(1, dim // 64) heads."""

    def __init__(self, kind, dim, classes, cls):
        super().__init__()
        self.kind, self.cls = kind, cls
        if kind == "block":
            heads = max(1, dim // 64)
            self.block = Block(dim, heads if dim % heads == 0 else 1)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        if kind == "mlp":
            self.fc1 = nn.Linear(dim, MLP_HIDDEN)
            self.fc2 = nn.Linear(MLP_HIDDEN, classes)
        elif kind in ("linear", "block"):
            self.fc = nn.Linear(dim, classes)
        else:
            raise ValueError(f"unknown token head kind {kind!r} (linear|mlp|block)")

    def forward(self, h):
        if self.kind == "block":
            h = self.block(h)
        z = self.norm(token_pool(h, self.cls))
        if self.kind == "mlp":
            return self.fc2(F.relu(self.fc1(z)))
        return self.fc(z)


class VitSplitNet(nn.Module):
    def __init__(self, model, in_channels, classes, ranges, head="linear", size=32, patch=None,
                 pool="cls"):
        super().__init__()
        depth, dim, heads = vit_dims(model)
        self.ranges = validate_ranges(ranges, depth + 1)
        patch = patch or default_patch(size)
        self.cls = pool == "cls"
        tokens = (size // patch) ** 2 + int(self.cls)
        self.patch_embed = PatchEmbed(in_channels, dim, patch, tokens, self.cls)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc = nn.Linear(dim, classes)
        self.aux = nn.ModuleDict()
        for a, b in self.ranges[:-1]:
            self.aux[str(b - 1)] = TokenHead(head, dim, classes, self.cls)
        self._units = [self.patch_embed] + list(self.blocks)

    # timm's no_weight_decay(): besides rank-1 tensors.
    no_weight_decay = ("patch_embed.cls_token", "patch_embed.pos_embed")

    K = SplitNet.K
    forward_module = SplitNet.forward_module
    forward = SplitNet.forward
    exported_state = SplitNet.exported_state
    load_exported = SplitNet.load_exported

    def head_logits(self, k, h):
        if k == self.K - 1:
            return self.fc(self.norm(token_pool(h, self.cls)))
        return self.aux[str(self.ranges[k][1] - 1)](h)
