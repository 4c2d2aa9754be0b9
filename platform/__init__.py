"""The platform layer, importable as `openllama`: CLI, configs, Ray job submission, MLflow tracking.
Found as a top-level `platform` (repo root on sys.path), it hands over the standard library's module instead."""

if __name__ == "platform":  # the repo root shadows the standard library's `platform`; undo that
    import importlib.util as _util
    import sys as _sys
    import sysconfig as _sysconfig

    _spec = _util.spec_from_file_location("platform", _sysconfig.get_path("stdlib") + "/platform.py")
    _stdlib_platform = _util.module_from_spec(_spec)
    _sys.modules["platform"] = _stdlib_platform
    _spec.loader.exec_module(_stdlib_platform)
