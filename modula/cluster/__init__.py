"""The top layer beside the CLI: deploy files rendered from the config (Ray Serve config, KubeRay
manifests, cluster launcher YAML) and ``modula submit`` (any command as a Ray job)."""

from modula.cluster.render import TARGETS, RenderError, render_objects, render_target
from modula.cluster.submit import SubmitError, build_job, run_job

__all__ = ["TARGETS", "RenderError", "SubmitError", "build_job", "render_objects",
           "render_target", "run_job"]
