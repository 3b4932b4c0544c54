"""Old import path of :class:`~.tracker.Tracker`, kept only for ``engine/trainer.py`` until it imports
``spnet_dist.tracking.tracker``; nothing else uses it. Delete this file then."""
from .tracker import Tracker

__all__ = ["Tracker"]
