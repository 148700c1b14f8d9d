"""pqmsg-server: a post-quantum, end-to-end-encrypted messaging relay on Trio."""

__version__ = "0.1.0"
