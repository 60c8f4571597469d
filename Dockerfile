# pgproxy container image: the same install as on a host (a venv in /opt/pgproxy), run as a
# non-root user, configuration from a mounted file, audit trail on a volume.
#   docker build -t pgproxy .
#   docker run -p 6432:6432 -v ./pgproxy.toml:/etc/pgproxy/pgproxy.toml:ro \
#     -v pgproxy-audit:/var/lib/pgproxy -e PGPROXY_BACKEND_PASSWORD=... pgproxy
# In the mounted config: listen = ["0.0.0.0:6432"], audit.file = "/var/lib/pgproxy/audit.jsonl".
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PGPROXY_HEALTH_PORT=6432

WORKDIR /src
COPY pyproject.toml README.md ./
COPY conf/constraints.txt conf/constraints.txt
COPY pgproxy ./pgproxy
RUN python -m venv /opt/pgproxy \
    && /opt/pgproxy/bin/pip install --no-cache-dir -c conf/constraints.txt . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgproxy \
    && install -d -o pgproxy -g pgproxy -m 0700 /var/lib/pgproxy \
    && install -d -m 0755 /etc/pgproxy

ENV PATH=/opt/pgproxy/bin:$PATH
WORKDIR /var/lib/pgproxy
VOLUME ["/var/lib/pgproxy"]
USER 10001
EXPOSE 6432
STOPSIGNAL SIGTERM
# The listener accepts connections (metrics and /readyz come with the operations issue).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import os, socket; socket.create_connection(('127.0.0.1', int(os.environ['PGPROXY_HEALTH_PORT'])), 2).close()"]
ENTRYPOINT ["pgproxy"]
CMD ["serve", "-c", "/etc/pgproxy/pgproxy.toml"]
