"""FedCoE's own config keys (the ``fedcoe`` section), their defaults and checks."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import ExperimentConfig, Section, bad_value, require

LOCAL_PARTS = ("head", "expert_head", "expert", "none")
ASSIGNMENT_LEVELS = ("client", "sample", "class", "label_split", "class_groups")
GATE_INPUTS = ("image", "trunk", "trunk_flat")
COLDSTART_PRIORS = ("predicted", "uniform")
CLASS_GROUPS_SOURCES = ("trained", "received")


@dataclass(frozen=True)
class FedCoEParams(Section):
    top_m: int = 0  # experts per client; 0 -> all K (model.num_experts)
    aux_weight: float = 2.0  # weight of the global mixture's own loss (docs/algorithms/fedcoe.md)
    prox_mu: float = 0.01  # proximal term on the shared parts, as FedProx
    local_part: str = "head"
    shared_trunk: bool = True  # experts share one trunk (averaged like FedAvg) and differ in their heads
    # how many of the CNN's two convolutions the shared trunk holds (1: each expert, and the
    # shared expert, has its own second convolution as well as its FC layers)
    trunk_convs: int = 2
    # the shared gate over the shared trunk's feature map ("trunk": two convolutions, pooled), over
    # it flattened ("trunk_flat": one hidden layer of 8 x gate_width, like an expert's head) or the image
    gate_input: str = "trunk"
    gate_width: int = 16
    # an always-on shared expert beside the K routed ones (DeepSeekMoE's shared expert): the shared
    # trunk's own head, averaged like the trunk, mixed into every prediction with this weight, so
    # that routed experts may specialise without the mixture losing a dense path (0: off)
    shared_expert_weight: float = 0.5
    gate_temperature: float = 1.0  # softmax temperature of the shared gate (< 1: sharper routing)
    # IFCA-style client-level assignment (Ghosh et al. 2020): the gate is also trained to send the
    # client's images to the expert of its set with the lowest loss on them, with this weight (0: off)
    assignment_weight: float = 1.0
    # "client": one expert per client (IFCA); "sample": each image's own lowest-loss expert (hard EM);
    # "class": each class of a batch to one expert, capacity-limited; "label_split": class c to
    # expert c mod K; "class_groups": confusable classes to one expert, the groups chosen at each
    # aggregation from the clients' label-free prediction co-occurrence (algorithm.routing_targets)
    assignment_level: str = "class_groups"
    # "class_groups": the mixture whose predicted-class co-occurrence on the client's images groups
    # the classes: after local training ("trained": at label skew it mostly tells which classes
    # share a client) or as the client received it ("received": the pool's own confusions)
    class_groups_from: str = "received"
    # "class_groups": restarts of the grouping search besides the last round's map, which alone can
    # stay at a local optimum (aggregation.class_groups; 0: the last round's map only)
    class_groups_restarts: int = 8
    local_loss_weight: float = 1.0  # cross-entropy of the local part alone, added to the client's loss
    local_prior_correction: bool = True  # the client's model re-weights the pool by its own label prior
    local_gate: bool = True
    correlation_weighting: bool = True
    correlation_smoothing: float = 0.5
    correlation_cap: float = 0.5
    coldstart_adabn: bool = True
    coldstart_em: bool = True
    coldstart_top_m: bool = False
    coldstart_prior: str = "predicted"  # EM's training prior: "predicted" (clients' mean predictions) | "uniform"

    adaptation_keys = ("coldstart_adabn", "coldstart_em", "coldstart_top_m", "coldstart_prior")

    def check(self, cfg: ExperimentConfig) -> None:
        require(self, ge0=("top_m", "aux_weight", "prox_mu", "local_loss_weight", "assignment_weight",
                           "class_groups_restarts"),
                ge1=("gate_width",),
                gt0=("gate_temperature",),
                choices={"local_part": LOCAL_PARTS, "gate_input": GATE_INPUTS, "coldstart_prior": COLDSTART_PRIORS,
                         "assignment_level": ASSIGNMENT_LEVELS, "class_groups_from": CLASS_GROUPS_SOURCES})
        if self.trunk_convs not in (1, 2):
            raise bad_value("trunk_convs", self.trunk_convs, "must be 1 or 2 (of the CNN's two convolutions)")
        if self.trunk_convs != 2 and cfg.network.model == "resnet_moe":
            raise bad_value("trunk_convs", self.trunk_convs,
                            "ResNet-MoE's trunk is every stage but the last: leave trunk_convs at 2")
        if self.local_part == "expert_head" and not self.shared_trunk:
            raise bad_value("local_part", self.local_part,
                            "'expert_head' sits on the shared trunk: set shared_trunk=true (or use 'head')")
        if self.gate_input.startswith("trunk") and not self.shared_trunk:
            raise bad_value("gate_input", self.gate_input,
                            "'trunk' routes on the shared trunk's features: set shared_trunk=true (or use 'image')")
        if not 0 <= self.shared_expert_weight < 1:
            raise bad_value("shared_expert_weight", self.shared_expert_weight, "must be in [0, 1)")
        if self.shared_expert_weight > 0 and not self.shared_trunk:
            raise bad_value("shared_expert_weight", self.shared_expert_weight,
                            "the shared expert is the shared trunk's head: set shared_trunk=true or shared_expert_weight=0")
        if self.top_m > cfg.network.num_experts:
            raise bad_value("top_m", self.top_m, f"must be <= num_experts ({cfg.network.num_experts}); 0 means all")
        if not 0 <= self.correlation_smoothing <= 1:
            raise bad_value("correlation_smoothing", self.correlation_smoothing, "must be in [0, 1]")
        if not 0 < self.correlation_cap <= 1:
            raise bad_value("correlation_cap", self.correlation_cap, "must be in (0, 1]")


def experts_per_client(cfg: ExperimentConfig) -> int:
    """m: the size of a client's expert set (all K when top_m is 0)."""
    return cfg.top_m or cfg.num_experts
