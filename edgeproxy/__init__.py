"""edgeproxy: an SMTP edge proxy that refuses relaying inline and pipelines legitimate mail."""

__version__ = "0.1.0"
