#!/usr/bin/env python3
"""Independent PyTorch reference for sgr: one training step (bp / dgl / sgr) and a CPU benchmark.

    python sgr_ref.py step  --weights W.safetensors --batch B.safetensors --config C.json --out O.safetensors
    python sgr_ref.py bench --model resnet32 --batch-size 128 --modules 4 --rule sgr --steps 10 --warmup 2 --threads 2
    python sgr_ref.py init  --config C.json --weights W.safetensors --batch B.safetensors --batch-size 8 --size 32

See README.md for the conventions.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import st  # noqa: E402
from model import LocalLoss, SplitNet, VitSplitNet, table_ranges, vit_dims, vit_ranges  # noqa: E402

DEFAULTS = {
    "model": "resnet20",
    "modules": None,  # defaults to len(module_ranges), else 1
    "module_ranges": None,
    "aux_head": "conv",
    "rule": "bp",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "nesterov": False,
    "decay_bn_and_bias": False,
    "lambda": 1.0,
    "sgr_distance": "l2",
    "sgr_from": 2,
    "sgr_every": 1,
    "step": 0,
    "in_channels": 3,
    "classes": 10,
    "dtype": "f32",
    "optimizer": "sgd",
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "label_smoothing": 0.0,
    "steps": 1,
    "size": 32,
    "patch_size": None,
    "token_pool": "cls",
    "local_loss": "ce",
    "infopro_recon_weights": None,
    "infopro_class_weights": None,
    "infopro_class": "softmax",
    "infopro_temperature": 0.07,
    "predsim_beta": 0.99,
    "input_mean": None,
    "input_std": None,
}


def full_config(cfg):
    out = dict(DEFAULTS)
    out.update({k: v for k, v in cfg.items() if v is not None})
    if out["rule"] not in ("bp", "dgl", "sgr"):
        raise ValueError(f"unknown rule {out['rule']!r}")
    if out["sgr_distance"] not in ("l2", "cosine"):
        raise ValueError(f"unknown sgr_distance {out['sgr_distance']!r}")
    return out


def torch_dtype(name):
    return {"f32": torch.float32, "f64": torch.float64}[name]


def build(cfg):
    vit = cfg["model"].startswith("vit-")
    k = int(cfg["modules"] or 1)
    if cfg["module_ranges"]:
        ranges = cfg["module_ranges"]
    elif vit:
        ranges = vit_ranges(vit_dims(cfg["model"])[0], k)
    else:
        ranges = table_ranges(cfg["model"], k)
    if cfg["module_ranges"] and cfg["modules"] is not None and len(ranges) != int(cfg["modules"]):
        raise ValueError(f"module_ranges has {len(ranges)} entries but modules={cfg['modules']}")
    if vit:
        net = VitSplitNet(cfg["model"], int(cfg["in_channels"]), int(cfg["classes"]), ranges,
                          cfg["aux_head"], int(cfg["size"]), cfg["patch_size"], cfg["token_pool"])
    else:
        net = SplitNet(cfg["model"], int(cfg["in_channels"]), int(cfg["classes"]), ranges,
                       cfg["aux_head"], LocalLoss(cfg), int(cfg["size"]))
    return net.to(torch_dtype(cfg["dtype"])).train()


# ---------------------------------------------------------------------------------------------
# Optimizer: torch.optim.SGD (dampening 0), as a PyTorch user would write it: two parameter
# groups, weight decay only on tensors of rank >= 2 unless decay_bn_and_bias. On CUDA it uses
# its default multi-tensor (foreach) implementation.


def make_optimizer(net, cfg):
    decay_all = bool(cfg["decay_bn_and_bias"])
    skip = getattr(net, "no_weight_decay", ())
    named = sorted(net.named_parameters())
    decays = [decay_all or (p.ndim >= 2 and n not in skip) for n, p in named]
    decayed = [p for (_, p), d in zip(named, decays) if d]
    others = [p for (_, p), d in zip(named, decays) if not d]
    groups = [{"params": decayed, "weight_decay": float(cfg["weight_decay"])},
              {"params": others, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=float(cfg["lr"]), betas=tuple(cfg["adam_betas"]),
                                 eps=float(cfg["adam_eps"]))
    return torch.optim.SGD(groups, lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                           nesterov=bool(cfg["nesterov"]))


def local_loss(logits, y):
    # Set once per process from the config (the rules below take the loss as PyTorch users
    # write it: F.cross_entropy with label_smoothing).
    return F.cross_entropy(logits, y, label_smoothing=LABEL_SMOOTHING)


LABEL_SMOOTHING = 0.0


# ---------------------------------------------------------------------------------------------
# Rules. Each computes gradients into .grad and returns (plain local losses, sgr penalties).


def rule_bp(net, x, y):
    K = net.K
    h = x
    losses = [None] * K
    total = 0
    for k in range(K):
        h = net.forward_module(k, h)
        if k < K - 1:  # probe: no gradient into the backbone
            losses[k] = local_loss(net.head_logits(k, h.detach()), y)
            total = total + losses[k]
    losses[K - 1] = local_loss(net.head_logits(K - 1, h), y)
    (total + losses[K - 1]).backward()
    return losses, {}


def sgr_distance(g_in, g_prev, kind):
    if kind == "l2":
        return g_in.shape[0] * (g_in - g_prev).pow(2).sum()
    return 1 - (g_in * g_prev).sum() / (g_in.norm() * g_prev.norm() + 1e-12)


def module_loss(net, k, h_out, x, y):
    """Module k's local loss (--local-loss; cross-entropy on a ViT, which has no other)."""
    if hasattr(net, "local_loss"):
        return net.local_loss(k, h_out, x, y)
    return local_loss(net.head_logits(k, h_out), y)


def rule_local(net, x, y, sgr=None):
    """dgl when sgr is None; else sgr = dict(lam, distance, first) with `first` the 1-based
    first regularised module (module 0 never is)."""
    K = net.K
    h = x
    g_prev = None
    losses, penalties = [None] * K, {}
    for k in range(K):
        penalise = sgr is not None and k >= 1 and k + 1 >= sgr["first"]
        forward_grad = sgr is not None and k + 1 < K and k + 2 >= sgr["first"]
        h_in = h.detach()
        if penalise:
            h_in.requires_grad_(True)
        h_out = net.forward_module(k, h_in)
        loss = module_loss(net, k, h_out, x, y)
        losses[k] = loss
        g_next = None
        if forward_grad:  # gradient of the PLAIN local loss w.r.t. this module's output
            g_next = torch.autograd.grad(loss, h_out, retain_graph=True)[0].detach()
        if penalise:
            g_in = torch.autograd.grad(loss, h_in, create_graph=True, retain_graph=True)[0]
            dist = sgr_distance(g_in, g_prev, sgr["distance"])
            penalties[k] = dist
            (loss + sgr["lam"] * dist).backward()
            h_in.grad = None
        else:
            loss.backward()
        h = h_out.detach()
        g_prev = g_next
    return losses, penalties


def compute_grads(net, x, y, cfg):
    rule = cfg["rule"]
    if rule == "bp":
        return rule_bp(net, x, y)
    if rule == "dgl":
        return rule_local(net, x, y)
    every = max(1, int(cfg["sgr_every"]))
    if int(cfg["step"]) % every != 0:  # not a regularised step: plain dgl
        return rule_local(net, x, y)
    sgr = {"lam": float(cfg["lambda"]), "distance": cfg["sgr_distance"], "first": int(cfg["sgr_from"])}
    return rule_local(net, x, y, sgr)


def train_step(net, opt, x, y, cfg, keep_grads=False):
    opt.zero_grad()
    losses, penalties = compute_grads(net, x, y, cfg)
    grads = None
    if keep_grads:
        grads = {
            n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in net.named_parameters()
        }
    opt.step()
    return losses, penalties, grads


# ---------------------------------------------------------------------------------------------
# CLI


def cmd_step(args):
    with open(args.config) as f:
        cfg = full_config(json.load(f))
    dtype = torch_dtype(cfg["dtype"])
    net = build(cfg)
    weights, _ = st.load(args.weights)
    net.load_exported(weights)
    batch, _ = st.load(args.batch)
    x = batch["images"].to(dtype)
    y = batch["labels"].to(torch.int64)
    global LABEL_SMOOTHING
    LABEL_SMOOTHING = float(cfg["label_smoothing"])
    opt = make_optimizer(net, cfg)
    # `steps` updates on the same batch (the optimizer state must agree, not only one step);
    # the gradients written are the last step's.
    for step in range(int(cfg["steps"])):
        losses, penalties, grads = train_step(net, opt, x, y, dict(cfg, step=int(cfg["step"]) + step),
                                                keep_grads=True)
    out = {}
    for n, g in grads.items():
        out[f"grad.{n}"] = g
    for n, t in net.exported_state().items():
        out[n] = t
    for k, l in enumerate(losses):
        out[f"loss.{k}"] = l.detach().reshape(())
    if args.with_penalty:
        for k, d in penalties.items():
            out[f"penalty.{k}"] = d.detach().reshape(())
    meta = {"config": json.dumps(cfg), "module_ranges": json.dumps(net.ranges)}
    st.save(args.out, out, meta)
    print(json.dumps({"out": args.out, "losses": [float(l) for l in losses],
                      "module_ranges": net.ranges}))


def cmd_init(args):
    """Writes random initial weights (PyTorch default init) and a random batch for a config."""
    with open(args.config) as f:
        cfg = full_config(json.load(f))
    torch.manual_seed(args.seed)
    net = build(cfg)
    st.save(args.weights, net.exported_state())
    if args.batch:
        c = int(cfg["in_channels"])
        x = torch.randn(args.batch_size, c, args.size, args.size, dtype=torch_dtype(cfg["dtype"]))
        y = torch.randint(0, int(cfg["classes"]), (args.batch_size,), dtype=torch.int64)
        st.save(args.batch, {"images": x, "labels": y})


def proc_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def gpu_used_bytes():
    """GPU 0's used memory from nvidia-smi, the same reading `sgr bench` takes on CUDA."""
    import subprocess
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                          "-i", "0"], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) * 1024 * 1024


def profile_steps(net, opt, x, y, cfg, path, cuda, steps=5):
    """Profiles `steps` training steps with torch.profiler; writes the op table and a summary
    (wall time vs. time the GPU or CPU kernels were busy, kernel launches) to `path`."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            losses, _, _ = train_step(net, opt, x, y, cfg)
            float(losses[-1])
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with open(path, "w") as f:
        if cuda:
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy_ms = sum(e.device_time for e in kernels) / 1e3 / steps
            f.write(f"wall ms/step (profiled) {wall_ms:.2f}; GPU kernel time ms/step {busy_ms:.2f}; "
                    f"kernels/step {len(kernels) / steps:.0f}\n")
        else:
            f.write(f"wall ms/step (profiled) {wall_ms:.2f}\n")
        f.write(events.table(sort_by=sort, row_limit=25))


def cmd_bench(args):
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = full_config({
        "model": args.model, "modules": args.modules, "aux_head": args.aux_head, "rule": args.rule,
        "in_channels": args.in_channels, "classes": args.classes, "dtype": args.dtype,
        "lambda": args.lam, "sgr_distance": args.sgr_distance, "sgr_from": args.sgr_from,
        "sgr_every": args.sgr_every, "size": args.size,
    })
    net = build(cfg).to(device)
    opt = make_optimizer(net, cfg)
    dtype = torch_dtype(cfg["dtype"])
    x = torch.randn(args.batch_size, args.in_channels, args.size, args.size, dtype=dtype, device=device)
    y = torch.randint(0, args.classes, (args.batch_size,), dtype=torch.int64, device=device)
    if cuda:
        torch.cuda.synchronize()
        gpu_baseline = gpu_used_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    baseline = proc_status("VmRSS")
    times = []
    for i in range(args.warmup + args.steps):
        cfg["step"] = i
        t0 = time.perf_counter()
        losses, _, _ = train_step(net, opt, x, y, cfg)
        float(losses[-1])  # read the loss to host
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) * 1e3
        if i >= args.warmup:
            times.append(dt)
    peak = proc_status("VmHWM") - baseline
    if args.profile:
        profile_steps(net, opt, x, y, cfg, args.profile, cuda)
    if cuda:
        baseline = gpu_baseline
        peak = gpu_used_bytes() - gpu_baseline
    print(json.dumps({
        "ms_per_step": statistics.median(times),
        "ms_min": min(times),
        "peak_memory_bytes": peak,
        "baseline_rss_bytes": baseline,
        "hwm_reset": hwm_reset,
        "model": args.model, "batch_size": args.batch_size, "modules": args.modules,
        "module_ranges": net.ranges, "rule": args.rule, "threads": torch.get_num_threads(),
        "steps": args.steps, "warmup": args.warmup, "dtype": args.dtype,
        "torch": torch.__version__, "device": args.device,
    }))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("step", help="one training step; dump grads, updated variables, losses")
    s.add_argument("--weights", required=True)
    s.add_argument("--batch", required=True)
    s.add_argument("--config", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--with-penalty", action="store_true", help="also write penalty.{k} (sgr distance D)")

    i = sub.add_parser("init", help="write random weights (and a random batch) for a config")
    i.add_argument("--config", required=True)
    i.add_argument("--weights", required=True)
    i.add_argument("--batch")
    i.add_argument("--batch-size", type=int, default=8)
    i.add_argument("--size", type=int, default=32)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--threads", type=int, default=1)

    b = sub.add_parser("bench", help="time training steps on random data")
    b.add_argument("--model", default="resnet32")
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--modules", type=int, default=1)
    b.add_argument("--rule", default="bp", choices=["bp", "dgl", "sgr"])
    b.add_argument("--aux-head", default="conv", choices=["conv", "linear", "mlp", "block"])
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--in-channels", type=int, default=3)
    b.add_argument("--size", type=int, default=32)
    b.add_argument("--classes", type=int, default=10)
    b.add_argument("--dtype", default="f32", choices=["f32", "f64"])
    b.add_argument("--lambda", dest="lam", type=float, default=1.0)
    b.add_argument("--sgr-distance", default="l2", choices=["l2", "cosine"])
    b.add_argument("--sgr-from", type=int, default=2)
    b.add_argument("--sgr-every", type=int, default=1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--profile", help="after timing, profile 5 steps and write the op table here")

    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"step": cmd_step, "init": cmd_init, "bench": cmd_bench}[args.cmd](args)


if __name__ == "__main__":
    main()
