#!/usr/bin/env python3
"""Fast self-check of the reference (float64, tiny inputs, < 60 s on 2 cores).

1. exact SGR parameter gradients (double backward) vs central finite differences of the
   module objective  L_k(theta) + lambda * D(dL_k/dh_in, g_prev)  (l2 and cosine), rel err < 1e-6;
2. sgr with lambda = 0 equals dgl (gradients and updated variables);
3. bp with aux probes gives the same backbone/fc gradients as bp with K = 1;
4. safetensors round trip, and the `step` CLI end to end.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import st  # noqa: E402
import sgr_ref  # noqa: E402
from model import SplitNet, even_ranges, table_ranges  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
HERE = os.path.dirname(os.path.abspath(__file__))
FAILS = []


def check(name, ok, detail=""):
    print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}")
    if not ok:
        FAILS.append(name)


def tiny_cfg(**kw):
    cfg = dict(model="resnet20", modules=3, module_ranges=[[0, 2], [2, 5], [5, 10]], aux_head="conv",
               rule="sgr", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False,
               decay_bn_and_bias=False, sgr_distance="l2", sgr_from=2, in_channels=1, classes=10,
               dtype="f64")
    cfg["lambda"] = 1.0
    cfg.update(kw)
    return sgr_ref.full_config(cfg)


def tiny_data(cfg, b=4, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg["in_channels"], size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, cfg["classes"], (b,), generator=g)
    return x, y


def fresh_net(cfg, seed=0):
    torch.manual_seed(seed)
    net = sgr_ref.build(cfg)
    # non-trivial BN affine params so their gradients are generic
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith("bn1.weight") or n.endswith("bn2.weight") or n.endswith("bn.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.uniform_(-0.2, 0.2)
    return net


def module_param_names(net, k):
    a, b = net.ranges[k]
    prefixes = []
    for u in range(a, b):
        if u == 0:
            prefixes += ["conv1.", "bn1."]
        else:
            n = (len(net._units) - 1) // 3
            s, i = divmod(u - 1, n)
            prefixes.append(f"layer{s + 1}.{i}.")
    prefixes.append("fc." if k == net.K - 1 else f"aux.{b - 1}.")
    return [n for n, _ in net.named_parameters() if any(n.startswith(p) for p in prefixes)]


def fd_check(distance, lam):
    cfg = tiny_cfg(sgr_distance=distance)
    cfg["lambda"] = lam
    x, y = tiny_data(cfg)
    net = fresh_net(cfg)
    saved = {n: t.clone() for n, t in net.state_dict().items()}
    opt = sgr_ref.make_optimizer(net, cfg)
    opt.zero_grad()
    sgr_ref.compute_grads(net, x, y, cfg)
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.load_state_dict(saved)
    params = dict(net.named_parameters())

    # independent objective of module k, with fixed h_in and g_prev from module k-1
    def inputs_for(k):
        with torch.no_grad():
            h = x
            for j in range(k - 1):
                h = net.forward_module(j, h)
        h_prev_in = h
        with torch.enable_grad():
            h_prev_out = net.forward_module(k - 1, h_prev_in)
            l_prev = F.cross_entropy(net.head_logits(k - 1, h_prev_out), y)
            g_prev = torch.autograd.grad(l_prev, h_prev_out)[0]
        return h_prev_out.detach(), g_prev.detach()

    worst = 0.0
    count = 0
    for k in (1, 2):
        h_in0, g_prev = inputs_for(k)

        def objective():
            h_in = h_in0.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(net.head_logits(k, net.forward_module(k, h_in)), y)
                g_in = torch.autograd.grad(loss, h_in)[0]
            return (loss + lam * sgr_ref.sgr_distance(g_in, g_prev, distance)).item()

        # a few entries: the largest-|grad| entry of several tensors of module k
        names = module_param_names(net, k)
        picks = [n for n in names if "conv1.weight" in n][:1] + [n for n in names if "bn2.weight" in n][:1] \
            + [n for n in names if n.endswith("bn1.bias")][:1] + [n for n in names if n.startswith(("aux", "fc"))][:2]
        for n in picks:
            g = grads[n]
            idx = int(g.abs().argmax())
            p = params[n]
            eps = 1e-6
            with torch.no_grad():
                orig = p.view(-1)[idx].item()
                p.view(-1)[idx] = orig + eps
                fp = objective()
                p.view(-1)[idx] = orig - eps
                fm = objective()
                p.view(-1)[idx] = orig
            fd = (fp - fm) / (2 * eps)
            an = g.view(-1)[idx].item()
            rel = abs(fd - an) / max(abs(fd), abs(an), 1e-8)
            worst = max(worst, rel)
            count += 1
            print(f"    {distance:6s} k={k} {n}[{idx}]: exact {an:+.10e} fd {fd:+.10e} rel {rel:.2e}")
    check(f"sgr {distance} (lambda={lam}) exact grad vs central FD, {count} entries", worst < 1e-6,
          f"max rel err {worst:.2e}")
    # the penalty must actually matter: compare with dgl gradient of a penalised module
    cfg_d = dict(cfg, rule="dgl")
    net.load_state_dict(saved)
    opt.zero_grad()
    sgr_ref.compute_grads(net, x, y, cfg_d)
    diff = max((grads[n] - p.grad).abs().max().item() for n, p in net.named_parameters()
               if n in module_param_names(net, 2))
    check(f"sgr {distance} penalty changes module-2 grads vs dgl", diff > 1e-8, f"max |diff| {diff:.2e}")


def full_step(cfg, seed=0, init_from=None):
    net = fresh_net(cfg, seed)
    if init_from is not None:  # share the backbone/fc values of another net
        with torch.no_grad():
            own = net.state_dict()
            for n, t in init_from.items():
                own[n].copy_(t)
    x, y = tiny_data(cfg)
    opt = sgr_ref.make_optimizer(net, cfg)
    losses, _, grads = sgr_ref.train_step(net, opt, x, y, cfg, keep_grads=True)
    return losses, grads, net.exported_state()


def lambda0_check():
    for dist in ("l2", "cosine"):
        c_s = tiny_cfg(sgr_distance=dist)
        c_s["lambda"] = 0.0
        c_d = tiny_cfg(rule="dgl")
        ls, gs, vs = full_step(c_s)
        ld, gd, vd = full_step(c_d)
        gdiff = max((gs[n] - gd[n]).abs().max().item() for n in gs)
        vdiff = max((vs[n] - vd[n]).abs().max().item() for n in vs)
        ldiff = max(abs(a.item() - b.item()) for a, b in zip(ls, ld))
        check(f"sgr({dist}, lambda=0) == dgl", max(gdiff, vdiff, ldiff) < 1e-12,
              f"grad {gdiff:.1e} vars {vdiff:.1e} loss {ldiff:.1e}")


def bp_probe_check():
    c4 = tiny_cfg(rule="bp")
    c1 = tiny_cfg(rule="bp", modules=1, module_ranges=[[0, 10]])
    _, g1, _ = full_step(c1)
    _, g4, _ = full_step(c4, init_from=fresh_net(c1).state_dict())
    diff = max((g4[n] - g1[n]).abs().max().item() for n in g1)
    check("bp: aux probes do not change backbone/fc grads", diff < 1e-12, f"max |diff| {diff:.1e}")


def optimizer_check():
    """make_optimizer (torch.optim.SGD, two groups) follows the documented update:
    d = g + wd*p only for ndim >= 2 unless decay_bn_and_bias, buf = mu*buf + d, p -= lr*(...)."""
    worst = 0.0
    for nesterov in (False, True):
        for decay_all in (False, True):
            torch.manual_seed(3)
            net = torch.nn.Module()
            net.w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
            net.b = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
            cfg = sgr_ref.full_config({"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                                       "nesterov": nesterov, "decay_bn_and_bias": decay_all})
            opt = sgr_ref.make_optimizer(net, cfg)
            mine = {"w": net.w.detach().clone(), "b": net.b.detach().clone()}
            bufs = {}
            for _ in range(3):
                gs = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(5, dtype=torch.float64)}
                net.w.grad, net.b.grad = gs["w"].clone(), gs["b"].clone()
                opt.step()
                for n, p in mine.items():
                    d = gs[n] + (5e-4 * p if (decay_all or p.ndim >= 2) else 0)
                    bufs[n] = d.clone() if n not in bufs else 0.9 * bufs[n] + d
                    p -= 0.1 * (d + 0.9 * bufs[n] if nesterov else bufs[n])
            worst = max(worst, (mine["w"] - net.w.detach()).abs().max().item(),
                        (mine["b"] - net.b.detach()).abs().max().item())
    check("make_optimizer (decay exclusion, nesterov) == documented SGD update", worst < 1e-14,
          f"max |diff| {worst:.1e}")


def splits_check():
    ok = table_ranges("resnet32", 2) == [(0, 8), (8, 16)]
    ok &= table_ranges("resnet32", 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    ok &= even_ranges(10, 4) == [(0, 2), (2, 4), (4, 7), (7, 10)]
    ok &= table_ranges("resnet110", 16)[-1] == (51, 55) and len(table_ranges("resnet110", 16)) == 16
    ok &= len(table_ranges("resnet110", 55)) == 55 and table_ranges("resnet56", 7)[0] == (0, 4)
    check("split tables", ok)


def names_check():
    net = SplitNet("resnet20", 3, 10, table_ranges("resnet20", 2), "mlp")
    names = set(net.exported_state())
    want = {"conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.running_mean", "layer3.2.bn2.bias", "aux.4.fc1.weight",
            "aux.4.fc2.bias", "fc.weight"}
    check("variable names", want <= names and not any("num_batches" in n for n in names)
          and "layer1.0.downsample.0.weight" not in names)


def cli_check():
    cfg = tiny_cfg()
    with tempfile.TemporaryDirectory() as d:
        cpath, w, b, o = (os.path.join(d, f) for f in ("c.json", "w.st", "b.st", "o.st"))
        with open(cpath, "w") as f:
            json.dump(cfg, f)
        net = fresh_net(cfg)
        x, y = tiny_data(cfg)
        st.save(w, {n: t.float() if t.is_floating_point() else t for n, t in net.exported_state().items()})
        st.save(b, {"images": x.float(), "labels": y})
        back, _ = st.load(b)
        rt = torch.equal(back["images"], x.float()) and torch.equal(back["labels"], y)
        check("safetensors round trip", rt)
        r = subprocess.run([sys.executable, os.path.join(HERE, "sgr_ref.py"), "step", "--weights", w,
                            "--batch", b, "--config", cpath, "--out", o, "--threads", "2"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            check("step CLI", False, r.stderr[-2000:])
            return
        out, meta = st.load(o)
        # in-process reference on the same (f32-rounded) inputs
        net2 = sgr_ref.build(cfg)
        net2.load_exported(st.load(w)[0])
        opt = sgr_ref.make_optimizer(net2, cfg)
        losses, _, grads = sgr_ref.train_step(net2, opt, x.float().double(), y, cfg, keep_grads=True)
        diff = max((out[f"grad.{n}"] - g).abs().max().item() for n, g in grads.items())
        diff = max(diff, max((out[n] - t).abs().max().item() for n, t in net2.exported_state().items()))
        nk = sum(1 for k in out if k.startswith("loss."))
        check("step CLI output", diff < 1e-12 and nk == 3 and out["loss.0"].dtype == torch.float64
              and "config" in meta, f"{len(out)} tensors, max |diff| {diff:.1e}")


def main():
    t0 = time.time()
    splits_check()
    optimizer_check()
    names_check()
    fd_check("l2", 1.0)
    fd_check("cosine", 1.0)
    lambda0_check()
    bp_probe_check()
    cli_check()
    print(f"{'ALL OK' if not FAILS else 'FAILED: ' + ', '.join(FAILS)} in {time.time() - t0:.1f} s")
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
