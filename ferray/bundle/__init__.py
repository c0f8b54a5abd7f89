"""Serving bundles: the ensemble of Model A and Model B, its fitted fusion, and the folder that holds
them (Ray-free).

    runtime.py     the Ensemble at inference (frozen bf16 and int8 copies), members from checkpoints
    fusion.py      fitting the fusion weight (and the alternatives the card records)
    card.py        bundle.json as typed records (BundleCard, MemberCard, Evaluation, ...)
    build.py       `ferray ensemble`: a bundle from trained checkpoints
    load.py        finding and loading a bundle; the default one that ships
    evaluation.py  every split x view for the card; `ferray evaluate --bundle`
"""

from ferray.bundle.build import build_bundle, model_card, run_facts, slim_checkpoint
from ferray.bundle.card import BUNDLE_FILE, BUNDLE_FORMAT, CARD_FILE, VIEWS, BundleCard, Evaluation, MemberCard
from ferray.bundle.evaluation import evaluate_bundle, evaluate_views, fused_report, write_fused_report
from ferray.bundle.fusion import fit_fusion, fit_weight, fuse, stacking_cv_accuracy
from ferray.bundle.load import (
    DEFAULT_BUNDLE,
    bundle_members,
    default_bundle_path,
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
    "MemberCard",
    "build_bundle",
    "bundle_members",
    "default_bundle_path",
    "evaluate_bundle",
    "evaluate_views",
    "fit_fusion",
    "fit_weight",
    "fuse",
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
