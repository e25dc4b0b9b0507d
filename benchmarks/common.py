"""The op benchmarks' measuring helpers, now ``flexkd.bench.common``; kept so ``import common`` from
``benchmarks/`` still works."""

from flexkd.bench.common import (  # noqa: F401
    CACHE_LINE,
    cache_lines_touched,
    copy_bandwidth_gbs,
    median_ms,
    peak_extra_mib,
    write_csv,
)
