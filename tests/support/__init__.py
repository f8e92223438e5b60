"""Helpers the tests share (fixtures stay in `tests/conftest.py`): the run's settings,
in-process workers, free ports, waiting, `seat-sync` commands and real processes, webhook
deliveries and the receiver in-process, the mirror's reads, network faults, the chaos
driver, and stand-ins for Polar itself written from its documented behaviour."""
