"""moderation-worker: self-hosted image moderation and tagging with OpenCLIP."""

__version__ = "0.1.0"
