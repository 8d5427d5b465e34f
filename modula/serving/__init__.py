"""Ray Serve graph: an OpenAI-compatible ingress, the request-level router and the expert
deployments; autoscaling from the config. `topology` names the deployments for a config."""
