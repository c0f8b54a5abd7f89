"""Serving bundles: an ensemble of any number of named members (Model A, Model B behind the SR
generator, ...), named sets of them, its fitted fusion, and the folder that holds them (Ray-free).

    runtime.py     the Ensemble at inference (frozen bf16 and int8 copies), members from checkpoints
    fusion.py      fitting the fusion: weights, temperatures (and the alternatives the card records)
    card.py        bundle.json as typed records (BundleCard, MemberCard, Evaluation, ...)
    build.py       `ferray ensemble`: a bundle from trained checkpoints
    load.py        finding and loading a bundle; the default one that ships
    evaluation.py  every split x view for the card; `ferray evaluate --bundle`
"""

from ferray.bundle.build import build_bundle, model_card, run_facts, slim_checkpoint
from ferray.bundle.card import BUNDLE_FILE, BUNDLE_FORMAT, CARD_FILE, VIEWS, BundleCard, Evaluation, MemberCard
from ferray.bundle.evaluation import evaluate_bundle, evaluate_views, fused_report, write_fused_report
from ferray.bundle.fusion import FusionRule, fit_fusion, fit_weights, fuse, stacking_cv_accuracy
from ferray.bundle.load import (
    DEFAULT_BUNDLE,
    answering_members,
    bundle_members,
    default_bundle_path,
    fusion_rule,
    load_bundle,
    read_bundle_card,
    resolve_bundle,
)
from ferray.bundle.runtime import Ensemble, load_members

__all__ = [
    "BUNDLE_FILE",
    "BUNDLE_FORMAT",
    "CARD_FILE",
    "DEFAULT_BUNDLE",
    "VIEWS",
    "BundleCard",
    "Ensemble",
    "Evaluation",
    "FusionRule",
    "MemberCard",
    "answering_members",
    "build_bundle",
    "bundle_members",
    "default_bundle_path",
    "evaluate_bundle",
    "evaluate_views",
    "fit_fusion",
    "fit_weights",
    "fuse",
    "fusion_rule",
    "fused_report",
    "load_bundle",
    "load_members",
    "model_card",
    "read_bundle_card",
    "resolve_bundle",
    "run_facts",
    "slim_checkpoint",
    "stacking_cv_accuracy",
    "write_fused_report",
]
