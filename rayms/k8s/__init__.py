"""The Kubernetes bridge: TrainedModel resources drive the registry, and the registry's state flows back.

``watcher`` lists and watches TrainedModels (relist on 410, reconnect with backoff); ``resources`` turns a
raw object into a validated :class:`~rayms.config.ModelSpec` and a registry status into a TrainedModel
status; ``bridge`` runs the pipeline (one sequential queue per object) and writes status back. This package
is the only place that imports ``kubernetes``.
"""

from rayms.k8s.bridge import TrainedModelBridge
from rayms.k8s.client import connect

__all__ = ["TrainedModelBridge", "connect"]
