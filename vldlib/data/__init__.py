"""Datasets: benchmark registry, checked folder loader, splits, transforms, cache, downloads.

>>> from vldlib.data import load_benchmark, list_benchmarks
>>> list_benchmarks()                                   # doctest: +SKIP
['DomainNet', 'OfficeHome', 'PACS', 'TerraIncognita', 'VLCS', 'emoji']
"""

from vldlib.data.folder import (DataError, MultiDomainFolder, load_benchmark, prepare_benchmark, resolve_benchmark,
                                scan_folder)
from vldlib.data.registry import BENCHMARKS, BenchmarkSpec, Source, get_spec, list_benchmarks, register_benchmark
from vldlib.data.splits import split_domain
from vldlib.data.transforms import eval_transform, train_transform

# The benchmarks register themselves when their module is imported; importing them here (any
# `vldlib.data.*` import runs this file first) fills the registry without a circular import.
# A new benchmark module is added to this line.
from vldlib.data import benchmarks, emoji  # noqa: E402,F401  isort: skip

__all__ = [
    "BENCHMARKS", "BenchmarkSpec", "DataError", "MultiDomainFolder", "Source", "eval_transform",
    "get_spec", "list_benchmarks", "load_benchmark", "prepare_benchmark", "register_benchmark", "resolve_benchmark",
    "scan_folder", "split_domain", "train_transform",
]
