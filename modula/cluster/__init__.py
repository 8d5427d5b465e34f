"""The one config (schema, YAML, overrides), the Ray connection, job submission and the
deploy files (Ray Serve config, KubeRay manifests, cluster launcher YAML) rendered from it."""

from modula.cluster.config import ConfigError, ModulaConfig, config_from_dict, load_config
from modula.cluster.connect import connect, ray_session

__all__ = ["ConfigError", "ModulaConfig", "config_from_dict", "connect", "load_config", "ray_session"]
