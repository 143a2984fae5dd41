"""rayms: multi-model serving on Ray Serve.

One application serves many models by name over KServe V1 and the Open Inference Protocol V2. Models
are added at run time (repository API, ``rayms`` CLI, Kubernetes TrainedModels, or Python) and live on
multiplexed replicas that load and evict them by memory. :func:`score` scores Parquet datasets offline
with the same models, on Ray Data; :func:`model_specs` gathers the models it may use.
"""

from rayms.config import ModelSpec, Settings

__all__ = ["ModelSpec", "Settings", "build_app", "model_specs", "score"]


def __getattr__(name: str):
    # Importing rayms must stay cheap (the CLI's HTTP commands do not need Ray).
    if name == "build_app":
        from rayms.app import build_app

        return build_app
    if name == "score":
        from rayms.cluster.batch import score

        return score
    if name == "model_specs":
        from rayms.scoring import model_specs

        return model_specs
    raise AttributeError(name)
