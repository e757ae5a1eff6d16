FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=3000 \
    DATA_DIR=/data

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY app.py worker.py config.py Procfile ./
COPY llm_proxy ./llm_proxy

# The queue and statuses live on a volume so they survive a container replacement.
RUN useradd --system --uid 10001 --home-dir /app proxy \
    && mkdir -p /data && chown proxy /data
VOLUME ["/data"]
USER proxy

EXPOSE 3000
# Same command as the Procfile's web line: web server plus supervised worker.
CMD ["python", "app.py"]
