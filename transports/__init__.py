"""Transport implementations: ``happen.transports.memory`` and ``happen.transports.nats``.

A system resolves a transport URL by importing ``happen.transports.<scheme>`` when it starts;
each module exposes ``from_url(url: str) -> Transport``.
"""
