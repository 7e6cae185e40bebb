"""Drafters, one file each: ``none`` (plain decoding, the baseline), ``ngram`` (prompt lookup),
``model`` (a small draft model on any backend), ``eagle3`` (an EAGLE-3 head: chains and trees) and
``lookup`` (prompt lookup first, a model-backed drafter where it finds nothing); ``gated`` wraps a
model-backed drafter so that it drafts only while its drafts measure faster than plain steps."""

from .eagle3 import DEFAULT_MIN_PROB, Eagle3Drafter, bundled_head
from .gated import PayingDrafter
from .lookup import LookupFirstDrafter
from .model import ModelDrafter
from .ngram import DEFAULT_LOOKUP_MIN_PROB, NgramDrafter
from .none import NoDrafter

__all__ = ["DEFAULT_LOOKUP_MIN_PROB", "DEFAULT_MIN_PROB", "Eagle3Drafter", "LookupFirstDrafter", "ModelDrafter",
           "NgramDrafter", "NoDrafter", "PayingDrafter", "bundled_head"]
