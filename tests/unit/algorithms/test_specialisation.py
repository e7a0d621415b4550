"""Specialisation of a mixture (algorithms/specialisation.py): mutual information between the
gate's top expert and the class / the client, per-expert per-class accuracy, FedCoE's record and plot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedcoe_flwr.algorithms.specialisation import (expert_class_counts, mutual_information_bits,
                                                   per_expert_class_accuracy, plot_specialisation, specialisation)
from test_adaptation import one_round


def test_mutual_information_of_routing_by_class_and_of_routing_that_ignores_it():
    # expert k takes classes 2k and 2k+1: one bit; every class split evenly: none
    assert mutual_information_bits([[5, 5, 0, 0], [0, 0, 5, 5]]) == pytest.approx(1.0)
    assert mutual_information_bits([[5, 5, 5, 5], [5, 5, 5, 5]]) == pytest.approx(0.0)
    assert mutual_information_bits(np.eye(4)) == pytest.approx(2.0)  # log2(K) at most
    assert mutual_information_bits([[0, 0]]) == 0.0


def test_specialisation_tables():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    gate = torch.tensor([[0.9, 0.1]] * 4 + [[0.2, 0.8]] * 2)
    counts = expert_class_counts(gate.argmax(1), labels, 2, 3)
    assert counts.tolist() == [[2, 2, 0], [0, 0, 2]]
    right = torch.nn.functional.one_hot(labels, 3).float()
    wrong = torch.roll(right, 1, dims=1)
    assert per_expert_class_accuracy([right, wrong], labels, 4) == [[1.0, 1.0, 1.0, None], [0.0, 0.0, 0.0, None]]
    found = specialisation(gate, [right, wrong], labels, 3, client_rows=[[1.0, 0.0], [0.0, 1.0]])
    assert found["expert_class_mi_bits"] == pytest.approx(mutual_information_bits(counts))
    assert found["expert_client_mi_bits"] == pytest.approx(1.0)  # each client its own expert
    # the mixture predicts classes 0 and 1 right and sends class 2 (gated to the wrong expert) to 0
    predicted = expert_class_counts(torch.tensor([0, 0, 1, 1, 0, 0]), labels, 3, 3)
    assert found["prediction_class_mi_bits"] == pytest.approx(mutual_information_bits(predicted))


def test_fedcoe_reports_its_specialisation_every_evaluation_and_plots_it(tmp_path):
    loop, _ = one_round(tmp_path, algorithm="fedcoe")
    record = loop.history[-1]
    assert 0.0 <= record["expert_class_mi_bits"] <= math.log2(2) + 1e-9
    assert 0.0 <= record["expert_client_mi_bits"] <= math.log2(2) + 1e-9
    assert 0.0 <= record["prediction_class_mi_bits"] <= math.log2(10) + 1e-9
    assert np.asarray(record["expert_class_counts"]).sum() == 60  # every global test image routed once
    assert np.asarray(record["expert_class_accuracy"], dtype=float).shape == (2, 10)
    assert (loop.run_dir.path / "specialisation.png").stat().st_size > 0
    assert plot_specialisation(record, tmp_path / "again.png").is_file()


@pytest.mark.parametrize("algorithm,experts", [("fedmoe_da", 2), ("pfedmoe", 2)])
def test_per_client_gates_report_each_clients_routing_of_the_global_test_set(tmp_path, algorithm, experts):
    loop, grid = one_round(tmp_path, algorithm=algorithm)
    record = loop.history[-1]
    assert 0.0 <= record["expert_class_mi_bits_min"] <= record["expert_class_mi_bits"] \
        <= record["expert_class_mi_bits_max"] <= math.log2(experts) + 1e-9
    replies = [r for r in grid.replies if r.metadata.message_type == "evaluate"]
    counts = [list(r.content.metric_records["metrics"]["expert_class_counts"]) for r in replies]
    assert len(counts) == 3 and all(len(c) == experts * 10 and sum(c) == 60 for c in counts)


def test_methods_without_a_mixture_report_no_specialisation(tmp_path):
    loop, _ = one_round(tmp_path, algorithm="fedper")
    assert not any(k.startswith("expert_") for k in loop.history[-1])


def test_ifca_assignment_picks_the_expert_with_the_lowest_loss_and_trains_the_gate_toward_it(tmp_path):
    from fedcoe_flwr.algorithms.fedcoe.algorithm import assigned_expert
    from fedcoe_flwr.algorithms.fedcoe.model import FedCoEModel
    from fedcoe_flwr.config import from_dict
    from fedcoe_flwr.data import ClientData

    cfg = from_dict({"image_size": 16, "width_multiplier": 0.25, "num_experts": 3, "gate_width": 4})
    model = FedCoEModel(cfg, 10, [0, 1, 2], with_private=False)
    x = (torch.rand(12, 3, 16, 16) * 255).to(torch.uint8)
    y = torch.zeros(12, dtype=torch.long)  # a one-class client
    with torch.no_grad():  # every expert predicts uniformly, but expert 1 favours this client's class
        for k in range(3):
            model.expert[str(k)].classifier.weight.zero_()
            model.expert[str(k)].classifier.bias.zero_()
        model.expert["1"].classifier.bias[0] = 5.0
    data = ClientData(x, y, x[:0], y[:0])
    assert assigned_expert(model, data, cfg, torch.device("cpu")) == 1
    loop, _ = one_round(tmp_path, algorithm="fedcoe", assignment_weight=1.0)
    assert loop.history[-1]["global_accuracy"] is not None


def test_hard_em_routes_each_image_to_the_expert_that_predicts_it_best(tmp_path):
    from fedcoe_flwr.algorithms.fedcoe.algorithm import routing_targets
    from fedcoe_flwr.algorithms.fedcoe.model import FedCoEModel
    from fedcoe_flwr.config import from_dict

    cfg = from_dict({"image_size": 16, "width_multiplier": 0.25, "num_experts": 3, "gate_width": 4})
    model = FedCoEModel(cfg, 10, [0, 2], with_private=False)  # a client holding experts 0 and 2
    with torch.no_grad():  # expert 0 favours class 3, expert 2 class 7
        for k, favoured in ((0, 3), (2, 7)):
            model.expert[str(k)].classifier.weight.zero_()
            model.expert[str(k)].classifier.bias.zero_()
            model.expert[str(k)].classifier.bias[favoured] = 5.0
    x = torch.randn(4, 3, 16, 16)
    assert routing_targets(model.eval(), x, torch.tensor([3, 7, 7, 3])).tolist() == [0, 2, 2, 0]
    # label_split: class c to the client's (c mod 2)-th expert, whatever the experts predict
    assert routing_targets(model, x, torch.tensor([0, 1, 2, 3]), "label_split").tolist() == [0, 2, 0, 2]
    # class_groups: the server's map, over the whole pool (expert 1 too, which this client lacks)
    class_expert = (1, 0, 2, 1, 0, 2, 1, 0, 2, 1)
    assert routing_targets(model, x, torch.tensor([0, 1, 2, 9]), "class_groups", class_expert).tolist() == [1, 0, 2, 1]
    loop, _ = one_round(tmp_path, algorithm="fedcoe", assignment_weight=1.0, assignment_level="sample")
    assert loop.history[-1]["global_accuracy"] is not None


def test_class_level_targets_send_each_class_to_one_expert_within_capacity():
    from fedcoe_flwr.algorithms.fedcoe.algorithm import balanced_class_assignment

    y = torch.tensor([0, 0, 1, 1, 2, 3, 3, 5])
    label_logp = torch.full((8, 4), -3.0)
    label_logp[:, 0] = -0.1  # expert 0 predicts every class best
    label_logp[y == 3, 2] = -0.05  # but expert 2 predicts class 3 better still
    choice = balanced_class_assignment(label_logp, y, 10)
    present = [0, 1, 2, 3, 5]
    counts = torch.bincount(choice[present], minlength=4)
    assert counts.max() <= 2  # ceil(5 classes / 4 experts): expert 0 cannot take them all
    assert choice[3] == 2 and (choice[present] == 0).sum() == 2
    batched = torch.func.vmap(lambda lp, yy: balanced_class_assignment(lp, yy, 10))  # per client in a cohort
    assert torch.equal(batched(torch.stack([label_logp, label_logp]), torch.stack([y, y]))[1], choice)


def test_class_level_routing_targets_train_through_a_round(tmp_path):
    loop, _ = one_round(tmp_path, algorithm="fedcoe", assignment_weight=1.0, assignment_level="class")
    assert loop.history[-1]["global_accuracy"] is not None


def test_class_groups_are_chosen_at_aggregation_and_sent_to_the_clients(tmp_path):
    from fedcoe_flwr.algorithms.fedcoe.model import CLASS_COOCCURRENCE

    loop, _ = one_round(tmp_path, algorithm="fedcoe", assignment_weight=1.0, assignment_level="class_groups")
    state, cfg = loop.state, loop.cfg
    class_expert = state.extra["class_expert"]
    assert sorted(np.bincount(class_expert, minlength=cfg.num_experts)) == sorted(
        np.bincount(np.arange(len(class_expert)) % cfg.num_experts, minlength=cfg.num_experts))
    _, config = loop.algorithm.train_payload(state, cfg, 0, 2)
    assert config["class_expert"] == [int(k) for k in class_expert]
    payload, _ = loop.algorithm.train_payload(state, cfg, 0, 2)
    assert CLASS_COOCCURRENCE in loop.algorithm.expected_upload(payload, config, cfg)
    # the round's log holds the map and how many classes left the initial one's expert
    import json

    logged = json.loads((tmp_path / "adapt" / "rounds.jsonl").read_text().splitlines()[-1])
    initial = np.arange(len(class_expert)) % cfg.num_experts
    assert logged["class_expert"] == [int(k) for k in class_expert]
    assert logged["class_groups_moved"] == int((initial != class_expert).sum())
