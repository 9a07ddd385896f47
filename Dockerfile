# The hive-bus image: the gateway and the workers (the `hive` command), for amd64 and arm64 alike
# (a Raspberry Pi 4 runs the arm64 one). Every dependency ships wheels for both, so nothing compiles:
#   docker build -t hive-bus .                                                 # this machine's arch
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/hive-bus --push .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hive_bus ./hive_bus
# Wheels for the target platform: under buildx this stage runs as the target (QEMU), so pip picks
# the aarch64 wheels on arm64.
# [all]: the gateway and every provider SDK, so one image runs any role
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[all]'

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin hive
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'hive-bus[all]' && rm -rf /wheels
# compose.yaml runs it as the host user that owns the mounted keys and passwords (HIVE_UID)
USER 10001
EXPOSE 8080
ENTRYPOINT ["hive"]
CMD ["--help"]
