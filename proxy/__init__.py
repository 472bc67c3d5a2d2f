"""signing-proxy: a local reverse proxy that signs every request with AWS SigV4."""

__version__ = "0.1.0"
