# One image for every role: `chat runserver --noworker`, `chat runworker`, `chat rundelay`.
FROM swift:6.2-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libhiredis-dev libsqlite3-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Package.swift ./
COPY Sources ./Sources
COPY Tests ./Tests
COPY Examples ./Examples
RUN swift build -c release --package-path Examples --product chat \
    && cp "$(swift build -c release --package-path Examples --show-bin-path)/chat" /usr/local/bin/chat

FROM swift:6.2-bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libhiredis0.14 libsqlite3-0 curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/chat /usr/local/bin/chat
# Served by a user of its own, not root (a fresh named volume takes /data's owner from here; a
# volume an earlier image filled as root needs `chown -R 10001:10001` once: the server says so
# at start-up, "attempt to write a readonly database").
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin channels \
    && mkdir -p /data && chown channels:channels /data
USER channels
ENV CHANNEL_LAYER=redis://redis:6379/0 \
    CHAT_DATABASE=/data/chat.sqlite3 \
    ALLOWED_HOSTS=localhost,127.0.0.1
VOLUME /data
EXPOSE 8000
ENTRYPOINT ["chat"]
CMD ["runserver", "--noworker", "--bind", "0.0.0.0"]
