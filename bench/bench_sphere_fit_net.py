"""Per-step wall time of full-batch training of the sphere study's net (FCNet d, h = 512, L = 1, relu, bias 1,
float64): the generic trainer (ntk_fast.train, dynamics="sgd", batch_size = n; it also records the test outputs
on its schedule) against ntk_fast.sphere.predictors.fit_net (hand-written forward and gradients, heavy ball),
300 steps each, alternated A/B three times; min and all three printed.  Result: bench/results/sphere_fit_net_step.txt
"""
import math, os, sys, time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ntk_fast.sphere import sample_sphere, sample_field
from ntk_fast.sphere.predictors import make_net, to_net_inputs, fit_net
from ntk_fast.dynamics.trainer import train
from ntk_fast.ntk.empirical import empirical_ntk
steps = 300
for d, n in ((2, 64), (5, 256)):
    g = torch.Generator().manual_seed(7)
    u = sample_sphere(n + 64, d, g); y = sample_field(u, 1.0, 1, g).values[0]
    x, xt = to_net_inputs(u[:n]), to_net_inputs(u[n:])
    alpha = 1000 / math.sqrt(512)
    K0 = empirical_ntk(make_net(d, 512, 0), x); lr = 0.5 * n / float(torch.linalg.eigvalsh(K0)[-1])
    old, new = [], []
    for rep in range(3):
        t0 = time.perf_counter()
        train(make_net(d, 512, 0), x, y[:n], alpha, x_test=xt, y_test=torch.zeros(64, dtype=torch.float64), loss="mse",
              dynamics="sgd", lr=lr, batch_size=n, max_steps=steps, progress=False)
        old.append((time.perf_counter() - t0) / steps * 1e6)
        o = fit_net(make_net(d, 512, 0), u[:n], y[:n], u[n:], alpha, K0=K0, max_steps=steps)
        new.append(o["wall"] / o["steps"] * 1e6)
    print(f"d={d} n={n} h=512 float64, {steps} steps x 3 reps (A/B alternated): generic trainer us/step "
          f"{[round(v) for v in old]} (min {min(old):.0f}); fit_net us/step {[round(v) for v in new]} (min {min(new):.0f}); "
          f"torch threads {torch.get_num_threads()}", flush=True)
print(os.popen("uptime").read().strip())
