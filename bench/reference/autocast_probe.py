"""How far PyTorch's own CPU autocast moves one gradient: a 7-layer conv-BN-ReLU net, batch 16
of 3x16x16, one cross-entropy backward at fp32, bf16 and fp16; prints the relative L2 error of
the reduced-precision gradients (BENCHMARKS.md, "Mixed precision on the CPU", for scale)."""
import torch, torch.nn as nn
torch.manual_seed(0)
def block(c): return nn.Sequential(nn.Conv2d(c,c,3,padding=1,bias=False), nn.BatchNorm2d(c), nn.ReLU())
net = nn.Sequential(nn.Conv2d(3,16,3,padding=1,bias=False), nn.BatchNorm2d(16), nn.ReLU(), *[block(16) for _ in range(6)], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16,3))
x = torch.randn(16,3,16,16); y = torch.randint(0,3,(16,))
def grads(dt):
    net.zero_grad()
    if dt is None:
        loss = nn.functional.cross_entropy(net(x), y)
    else:
        with torch.autocast("cpu", dtype=dt):
            loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()])
g = grads(None)
for dt in [torch.bfloat16, torch.float16]:
    h = grads(dt); print(dt, ((h-g).norm()/g.norm()).item())
