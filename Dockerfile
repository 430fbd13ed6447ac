# syntax=docker/dockerfile:1
# MobileViT classification service. Default image serves TFLite only (no TensorFlow, ~small);
# build with --build-arg EXTRAS=savedmodel to serve the SavedModel artifact too.
# `python -m app` sizes itself from the CPUs the container gets (affinity and cgroup cpu.max):
# processes, inference workers and decode threads; /model-info says what it chose. One image fits
# any pod size. PORT (KServe's convention) or MOBILEVIT_PORT sets the port.

FROM python:3.11-slim AS build
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject alone, so source edits do not re-install them; at the
# versions in constraints.txt, as make serve and make test install them.
COPY pyproject.toml constraints.txt ./
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in os.environ.get('EXTRAS', '').split(',') if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
    > requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r requirements.txt

FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MOBILEVIT_HOST=0.0.0.0
# No MOBILEVIT_PORT or MOBILEVIT_MODEL_DIR here: either would shadow KServe's PORT and STORAGE_URI.
# The defaults are port 8000 and the model under /srv/models.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /srv
COPY app/ app/
COPY contract/ contract/
COPY models/ models/
USER 1000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('MOBILEVIT_PORT') or os.environ.get('PORT') or '8000'; sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2).status != 200)"]
CMD ["python", "-m", "app"]
