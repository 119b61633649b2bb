# One image for the talkforge CLI, Ray head and Ray workers (CPU or GPU hosts).
FROM python:3.11-slim-bookworm
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      ffmpeg espeak-ng && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/talkforge
COPY requirements.lock pyproject.toml ./
RUN python -m pip install -q --no-deps -r requirements.lock
COPY . .
RUN python -m pip install -q --no-deps -e .
ENV HF_HUB_OFFLINE=1
ENTRYPOINT ["talkforge"]
