"""Benchmarks: trioproxy against nginx and the Python peers, in one run.

``python -m bench --help`` for the options; ``bench/README.rst`` for the method. The
package is a tool, not part of trioproxy: it imports nothing from ``trioproxy`` except
the HTTP parser seam that :mod:`bench.ceiling` measures.
"""
