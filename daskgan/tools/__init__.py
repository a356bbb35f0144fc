"""User tools on top of the library: the ``daskgan`` command line, ``generate``, ``sample`` and the loopback
sandbox that makes ``make demo`` self-contained."""
