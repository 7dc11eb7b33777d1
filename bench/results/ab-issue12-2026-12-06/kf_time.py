import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
import ntk_fast
try:
    from ntk_fast.ops.packed import pack_symmetric
except ImportError:
    from ntk_fast.reference_kernel import pack_symmetric
E = int(sys.argv[2]); n = int(sys.argv[3]); DT = getattr(torch, sys.argv[4])
g = torch.Generator().manual_seed(0)
A = torch.randn(n, 64, generator=g, dtype=DT)
K = A @ A.t() / 64
y = torch.sign(torch.randn(E, n, generator=g, dtype=DT))
f = torch.zeros(E, n, dtype=DT); gg = torch.randn(E, n, dtype=DT, generator=g)
r = torch.zeros(E, n, dtype=DT); c = torch.zeros(E, n, dtype=DT); dt = torch.full((E,), 1e-3, dtype=DT)
act = torch.ones(E, dtype=torch.bool)
res = []
for spec in sys.argv[5:]:
    fb = int(spec[1:]) if spec.startswith('f') else 0
    pb = 0 if fb else int(spec)
    th = pack_symmetric(K, pb) if pb else K.clone()
    reps = max(20, int(200 * (4000 / n) ** 2))
    op = lambda: torch.ops.ntk_fast.kernel_flow_step(th, y, f, gg, r, c, dt, act, "softhinge", 20.0, pb, fb)
    for _ in range(5): op()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); op(); ts.append(time.perf_counter() - t0)
    ts.sort()
    res.append(f"{spec}: min {ts[0]*1e3:.3f} ms, median {ts[len(ts)//2]*1e3:.3f} ms")
print(f"E={E} n={n} {DT}", " | ".join(res))
