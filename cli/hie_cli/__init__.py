"""The ``hie`` command: the local federation launcher, the demo and operator tools."""
