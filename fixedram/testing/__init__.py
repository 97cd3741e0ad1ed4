"""Test support: the test guests (:mod:`fixedram.testing.guest`) and starting and driving QEMU
(:mod:`fixedram.testing.vm`).

Used by the tests, the benchmarks, the fuzz corpus and ``fixedram demo``; no runtime module
(stream, io, image, endpoint, qmp, the other commands) imports it.
"""
