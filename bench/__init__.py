"""aisix benchmark: an upstream emulator, a load generator and a driver.

Run ``python -m bench [--quick] [--peers]``; see ``bench/README.md``.
Times are in milliseconds (ms) unless a name ends in ``_s`` (seconds).
"""
