"""Helpers the tests share (fixtures stay in `tests/conftest.py`): the run's settings,
in-process workers, free ports, waiting, real `seat-sync` processes, network faults, the
chaos driver, and stand-ins for Polar itself written from its documented behaviour."""
