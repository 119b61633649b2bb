"""Download stage: read dataset metadata, fetch source videos, cut and normalise clips."""
