# One image for every role: redis clients run `chat runserver --noworker` or `chat runworker`.
FROM swift:6.0-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libhiredis-dev pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Package.swift ./
COPY Sources ./Sources
COPY Tests ./Tests
RUN swift build -c release --product chat && cp "$(swift build -c release --show-bin-path)/chat" /usr/local/bin/chat

FROM swift:6.0-bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libhiredis0.14 curl && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/chat /usr/local/bin/chat
ENV CHANNEL_LAYER=redis://redis:6379/0
EXPOSE 8000
ENTRYPOINT ["chat"]
CMD ["runserver", "--noworker", "--bind", "0.0.0.0"]
