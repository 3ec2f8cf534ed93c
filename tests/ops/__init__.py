"""Tests of the fastdiv ops by op family, each parametrized over the backends (tests/ops/_helpers.py).

A package, so that its modules (``ops.test_eot``, ...) do not clash with the top-level test modules and can
share ``_helpers`` by relative import; ``from conftest import ...`` still reads tests/conftest.py.
"""
