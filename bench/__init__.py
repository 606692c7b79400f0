"""pgqueue benchmarks: every figure next to a raw-SQL ceiling measured in the same run.

Run ``python -m bench`` (full, about 15 minutes) or ``python -m bench --quick`` (under two
minutes). See ``docs/benchmarks.md`` for what is measured and how to read it.
"""
