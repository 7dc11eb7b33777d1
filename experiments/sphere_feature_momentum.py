"""python experiments/sphere_feature_momentum.py experiments/results/sphere_feature_momentum.json

Feature-regime nets trained to the same train mse (1e-4 C(1)) by plain GD (momentum 0) and heavy ball
(0.9): test error and how far apart the predictions end.  d = 5, nu_t in {1, 4} and d = 2, nu_t = 1.5,
n in {32, 64}, 2 draws; seeds as the study's script (draw -> seed 1000 d + draw, net seed draw)."""
import json, os, sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ntk_fast.sphere import sample_sphere, sample_field
from ntk_fast.sphere.predictors import make_net, fit_net, alpha_for_xi
h, m, mus = 512, 512, (0.0, 0.9)
out = []
for d, nu in ((5, 1.0), (5, 4.0), (2, 1.5)):
    for draw in range(2):
        g = torch.Generator().manual_seed(1000 * d + draw)
        u = sample_sphere(1024 + m, d, g); fs = sample_field(u, nu, 1, g); y, var = fs.values[0], fs.variance
        ut, yt = u[1024:], y[1024:]
        for n in (32, 64):
            rec = {"d": d, "nu_t": nu, "draw": draw, "n": n}
            preds = {}
            for mu in mus:
                o = fit_net(make_net(d, h, draw), u[:n], y[:n], ut, alpha_for_xi(0, h), momentum=mu,
                            target_mse=1e-4 * var, max_steps=100000, max_wall=20)
                preds[mu] = o["pred"]
                rec[str(mu)] = {"test": float(((o["pred"] - yt) ** 2).mean()) / var, "steps": o["steps"],
                                "status": o["status"], "train": o["train_mse"] / var}
            for mu in mus[1:]:
                rec[str(mu)]["pred_diff"] = float((preds[mu] - preds[0.0]).norm() / preds[0.0].norm())
            out.append(rec)
            print(json.dumps(rec), flush=True)
print(os.popen("uptime").read().strip())
json.dump(out, open(sys.argv[1], "w"), indent=1)
