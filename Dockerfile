# The hive-bus image: gateway and workers (the `hive` command). Builds for amd64 and arm64 alike.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY hive_bus ./hive_bus
COPY services ./services
COPY workers ./workers
RUN pip install --no-cache-dir . && useradd --system --no-create-home hive
USER hive
ENTRYPOINT ["hive"]
CMD ["--help"]
