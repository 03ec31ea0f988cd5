"""Where the broker keeps what changes: the interfaces here, ``memory/`` and ``redis/`` beside.

Routes import the interfaces only; ``broker.composition`` picks the implementation.
"""
