"""The benchmark suite (``pytest benchmarks --benchmark-only``); a package so its module names
(``benchmarks.test_models``, ``benchmarks.conftest``) never clash with ``tests/``'s."""
