"""A probe for end-to-end tests: with ``SDSWEEP_PERSIST_LOG`` set and this folder on PYTHONPATH,
every Python process of a sweep (the driver and Ray's workers, which inherit the environment)
wraps Ray Tune's ``StorageContext.persist_current_checkpoint`` -- the call that copies a reported
checkpoint directory into the run's storage -- and appends one JSON line per call: the directory
reported, the files and bytes Tune copied from it, and where it persisted. The real method runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
from pathlib import Path

_LOG = os.environ.get("SDSWEEP_PERSIST_LOG")
_TARGET = "ray.train._internal.storage"


def _wrap(module) -> None:
    original = module.StorageContext.persist_current_checkpoint

    def persist_current_checkpoint(self, checkpoint):
        files = [f for f in Path(checkpoint.path).rglob("*") if f.is_file()]
        persisted = original(self, checkpoint)
        with open(_LOG, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "source": str(checkpoint.path), "files": len(files),
                                "bytes": sum(p.stat().st_size for p in files), "dest": persisted.path}) + "\n")
        return persisted

    module.StorageContext.persist_current_checkpoint = persist_current_checkpoint


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _wrap(module)

        spec.loader.exec_module = exec_module
        return spec


if _LOG:
    sys.meta_path.insert(0, _Finder())
