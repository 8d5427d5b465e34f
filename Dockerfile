# The image KubeRay pods and `ray up` clusters run: Ray 2.60 plus modula.
# On a GPU cluster, pip resolves the CUDA build of torch from the package index.
FROM rayproject/ray:2.60.0-py311
WORKDIR /home/ray/modula
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users modula ./modula
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir ".[triton]"
ENV MODULA_CONFIG=/etc/modula/config.yaml HF_HUB_OFFLINE=1
