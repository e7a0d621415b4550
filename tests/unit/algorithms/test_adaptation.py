"""The label-free adaptations every method gets (algorithms/adaptation.py): the predicted
training prior from the training clients, EM and AdaBN for every new-client model, the balanced
global model for every global model; each reported beside the unadapted figure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedcoe_flwr.algorithms.adaptation import (HELDOUT_NLL_KEY, NUM_HELDOUT_KEY, TEMPERATURES, TEMPERED_PROBS_KEY,
                                               Calibration, balanced, calibration_config, calibration_of,
                                               federation_calibration, federation_prior, label_free_scores,
                                               prior_correct, reestimate_batchnorm, tempered, tempered_prior)
from fedcoe_flwr.config import from_dict
from fedcoe_flwr.server.loop import RoundLoop
from harness import InProcessGrid

CPU = torch.device("cpu")


def one_round(tmp_path, **kw) -> tuple[RoundLoop, InProcessGrid]:
    cfg = from_dict({**dict(dataset="synthetic", synthetic_train_size=240, synthetic_test_size=60, image_size=16,
                            num_clients=3, num_coldstart_clients=1, partition="dirichlet", dirichlet_alpha=0.3,
                            min_partition_size=5, model="cnn", width_multiplier=0.25, num_experts=2, gate_width=4,
                            local_epochs=1, batch_size=16, num_rounds=1, eval_every=1, results_dir=str(tmp_path),
                            cache_dir=str(tmp_path / "cache"), run_name="adapt"), **kw})
    grid = InProcessGrid({100 + i: {"partition-id": i, "num-partitions": cfg.num_partitions}
                          for i in range(cfg.num_partitions)})
    loop = RoundLoop(cfg)
    loop.start(grid)
    return loop, grid


@pytest.mark.parametrize("algorithm", ["fedavg", "fedper", "pfedmoe", "fedmoe_da", "fedcoe"])
def test_every_new_client_model_is_scored_raw_and_with_em_from_the_predicted_prior(tmp_path, algorithm):
    loop, grid = one_round(tmp_path, algorithm=algorithm)
    record = loop.history[-1]
    for variant in ("plain", "em", "em_uniform", "em_calibrated"):
        assert 0.0 <= record[f"coldstart_accuracy_{variant}"] <= 1.0
    assert record["coldstart_temperature"] in TEMPERATURES
    prior = record["predicted_train_prior"]
    assert len(prior) == 10 and sum(prior) == pytest.approx(1.0, abs=1e-3)
    # the prior came from every training client (no labels: num_classes floats each), before cold start
    kinds = [m.metadata.message_type for m in grid.sent]
    assert kinds.count("evaluate.prior") == 3 and kinds.index("evaluate.prior") < kinds.index("evaluate.coldstart")
    sent = next(m for m in grid.sent if m.metadata.message_type == "evaluate.coldstart")
    assert list(sent.content.config_records["config"]["train_prior"]) == pytest.approx(prior, abs=1e-4)
    calibration = calibration_of(sent.content.config_records["config"])
    assert calibration.temperature == record["coldstart_temperature"] and len(calibration.prior) == 10
    if algorithm in ("fedavg", "fedcoe"):  # every global model raw and balanced by this same prior
        assert 0.0 <= record["global_accuracy_balanced"] <= 1.0 and "global_accuracy_raw" not in record
    if algorithm == "fedavg":
        assert record["coldstart_accuracy"] == record["coldstart_accuracy_plain"]  # the configured one: none


def test_no_adaptation_exchange_without_a_model_to_adapt(tmp_path):
    loop, grid = one_round(tmp_path, algorithm="fedper", num_coldstart_clients=0)
    assert "evaluate.prior" not in [m.metadata.message_type for m in grid.sent]
    assert "predicted_train_prior" not in loop.history[-1]


def test_clients_that_train_on_their_whole_partition_leave_personalised_unmeasured(tmp_path):
    # NIID-Bench's set-up: test_fraction 0, no cold-start clients; the global model is still balanced
    loop, _ = one_round(tmp_path, algorithm="fedavg", num_coldstart_clients=0, test_fraction=0.0, model="lenet")
    record = loop.history[-1]
    assert record["personalized_accuracy"] is None and record["coldstart_accuracy"] is None
    assert 0.0 <= record["global_accuracy"] <= 1.0 and 0.0 <= record["global_accuracy_balanced"] <= 1.0


def test_federation_prior_is_the_sample_weighted_mean():
    prior = federation_prior([[0.5, 0.5], [1.0, 0.0]], [1, 3])
    assert prior.tolist() == pytest.approx([0.875, 0.125], abs=1e-5)
    with pytest.raises(ValueError, match="at least one client"):
        federation_prior([], [])


def test_balanced_divides_the_training_prior_out():
    probs = torch.tensor([[0.6, 0.4]])
    train_prior = torch.tensor([0.75, 0.25])
    out = balanced(lambda x: probs, train_prior)(torch.zeros(1))
    assert out.tolist()[0] == pytest.approx(prior_correct(probs, torch.tensor([0.5, 0.5]), train_prior).tolist()[0])
    assert out.argmax().item() == 1  # 0.6/0.75 < 0.4/0.25


def test_label_free_scores_run_adabn_only_where_there_is_batchnorm():
    cfg = from_dict({"eval_batch_size": 8})
    torch.manual_seed(0)
    x = (torch.rand(20, 3, 4, 4) * 255).to(torch.uint8)
    y = torch.randint(0, 2, (20,))
    plain = nn.Sequential(nn.Flatten(), nn.Linear(48, 2), nn.Softmax(dim=1)).eval()
    scores = label_free_scores(plain, [plain], x, x, y, torch.tensor([0.7, 0.3]), cfg, CPU)
    assert set(scores) == {"plain", "em", "em_uniform"}
    bn = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 2),
                       nn.Softmax(dim=1)).eval()
    scores = label_free_scores(bn, [bn], x, x, y, None, cfg, CPU)
    assert set(scores) == {"plain", "em", "adabn", "adabn_em"}  # no prior: EM from a uniform one
    assert not reestimate_batchnorm(plain, x, cfg, CPU)


def share(nll: list[float], rows: list[list[float]], num_samples: int = 10, num_heldout: int = 5) -> dict:
    return {TEMPERED_PROBS_KEY: [v for row in rows for v in row], HELDOUT_NLL_KEY: nll,
            NUM_HELDOUT_KEY: num_heldout, "num_samples": num_samples}


def test_the_prior_at_a_temperature_is_its_block_weighted_by_training_images():
    k = len(TEMPERATURES)
    rows = [[0.5, 0.5]] + [[0.9, 0.1]] * (k - 1)
    shares = [share([0.0] * k, rows, num_samples=1), share([0.0] * k, [[1.0, 0.0]] * k, num_samples=3),
              share([0.0] * k, [[0.0, 1.0]] * k, num_samples=0)]  # no training images: left out
    assert tempered_prior(shares, 0).tolist() == pytest.approx([0.875, 0.125], abs=1e-5)  # T=1: the model as is
    assert tempered_prior(shares, 1).tolist() == pytest.approx([0.975, 0.025], abs=1e-5)
    scan = [share([0.0] * 3, [[0.5, 0.5], [0.2, 0.8], [0.4, 0.6]])]  # a scan's own 3 temperatures
    assert tempered_prior(scan, 2, num_temperatures=3).tolist() == pytest.approx([0.4, 0.6], abs=1e-5)


def test_the_federation_keeps_the_temperature_of_lowest_total_nll_and_the_prior_at_it():
    k = len(TEMPERATURES)
    best = TEMPERATURES.index(2.0)
    rows = [[1.0, 0.0] if i == best else [0.5, 0.5] for i in range(k)]
    a = share([5.0 if i == best else 6.0 for i in range(k)], rows, num_samples=10)
    b = share([3.0 if i == 0 else 4.0 for i in range(k)], [[0.0, 1.0] if i == best else [0.5, 0.5] for i in range(k)],
              num_samples=30)
    found = federation_calibration([a, b])  # totals: 9 at T=1, 9 at T=2, 10 elsewhere: the tie goes to T=1
    assert found.temperature == 1.0 and found.prior.tolist() == pytest.approx([0.5, 0.5], abs=1e-5)
    b[HELDOUT_NLL_KEY] = [4.0] * k
    found = federation_calibration([a, b])  # now 9 at T=2 alone
    assert found.temperature == 2.0 and found.prior.tolist() == pytest.approx([0.25, 0.75], abs=1e-5)
    assert federation_calibration([share([1.0] * k, rows, num_heldout=0)]) is None
    assert calibration_of(calibration_config(found)).temperature == 2.0
    assert calibration_of({}) is None and calibration_config(None) == {}


def test_temperature_keeps_each_prediction_and_softens_its_confidence():
    probs = torch.tensor([[0.9, 0.08, 0.02], [0.2, 0.7, 0.1]])
    assert torch.equal(tempered(probs, 1.0), probs)
    soft, sharp = tempered(probs, 2.0), tempered(probs, 0.75)
    assert torch.equal(soft.argmax(1), probs.argmax(1)) and torch.equal(sharp.argmax(1), probs.argmax(1))
    assert (soft.max(1).values < probs.max(1).values).all() and (sharp.max(1).values > probs.max(1).values).all()
    assert soft.sum(1).tolist() == pytest.approx([1.0, 1.0])


def test_calibrated_em_is_em_at_temperature_one_and_helps_an_overconfident_model():
    cfg = from_dict(dict(dataset="synthetic", eval_batch_size=64))
    # a new client of classes 0 and 1; the model's logits four times too large (overconfident)
    logits = torch.randn(40, 4, generator=torch.Generator().manual_seed(1)) * 4
    logits[:, 0] += 1.0
    table = torch.softmax(logits, 1)
    x, y = torch.zeros(40, 3, 8, 8, dtype=torch.uint8), torch.tensor([0] * 30 + [1] * 10)
    prior = torch.full((4,), 0.25)

    def scores(temperature: float) -> dict[str, float]:
        return label_free_scores(lambda b: table[:len(b)], [], x, x, y, prior, cfg, CPU,
                                 Calibration(temperature, prior))

    assert scores(1.0)["em_calibrated"] == scores(1.0)["em"] == pytest.approx(0.40)
    assert scores(3.0)["em_calibrated"] == pytest.approx(0.65) and scores(3.0)["em"] == pytest.approx(0.40)
