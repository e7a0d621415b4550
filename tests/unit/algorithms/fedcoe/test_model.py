"""FedCoE's model: the mixture over an expert set, the gate's temperature, the correlation plot."""

from __future__ import annotations

import numpy as np
import torch
from fedcoe_flwr.algorithms.fedcoe import FedCoE
from fedcoe_flwr.algorithms.fedcoe.model import FedCoEModel
from fedcoe_flwr.data import load_client_data, normalize


def test_model_mixture_restricted_to_top_experts(fedcoe_cfg):
    model = FedCoEModel(fedcoe_cfg, 4, [0, 1, 2], with_private=False)
    model.eval()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        full, _ = model.mixture(x)
        top1, _ = model.mixture(x, per_sample_top=1)
        best = model.gate_probs(x).argmax(1)
        for i in range(6):  # top-1: exactly the most gated expert's prediction
            expert = model.expert[str(int(best[i]))]
            torch.testing.assert_close(top1[i], torch.softmax(expert(x[i:i + 1]), 1)[0], rtol=1e-5, atol=1e-6)
        p, y = model(x)
    torch.testing.assert_close(p, y)  # no private part: the personalised model is the mixture
    torch.testing.assert_close(full.sum(1), torch.ones(6))


def test_correlation_plot_is_written(make_cfg, tmp_path):
    from fedcoe_flwr.algorithms.fedcoe.plots import plot_correlation
    path = plot_correlation(np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]), np.array([True, True, False]),
                            tmp_path / "correlation.png")
    assert path.is_file() and path.stat().st_size > 1000


def test_gate_temperature_sharpens_routing(make_cfg):
    cfg = make_cfg(num_experts=3, norm="group")
    sharp = cfg.replace(gate_temperature=0.25)
    state = FedCoE().init_state(cfg, 4)
    x = normalize(load_client_data(cfg, 0).train_x[:8])
    probs = []
    for c in (cfg, sharp):
        model = FedCoEModel(c, 4, [0, 1, 2], with_private=False)
        model.load_shared(state.arrays)
        with torch.no_grad():
            probs.append(model.gate_probs(x))
    torch.testing.assert_close(probs[1], torch.softmax(torch.log(probs[0]) / 0.25, 1), rtol=1e-4, atol=1e-6)
    assert probs[1].max(1).values.mean() > probs[0].max(1).values.mean()
