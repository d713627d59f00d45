"""The sans-IO SMTP core: bytes in, replies and events out; no asyncio, no sockets."""
