"""`serve run CONFIG` with the launching shell's NANOVLLM_API_KEY folded into the config.

    python -m deployments.launch serve_config.yaml [serve run flags]      (scripts/run.sh runs this)

Serve builds an application from a config file where the deploy lands: with `serve run` against a running
cluster (`ray start --head` first), that is a task on the cluster, which never sees the environment of the shell
that ran `serve run`; a key exported there would be silently ignored and the API served open. This launcher reads
the key where the deploy is submitted and writes it into each nanovllm application's `api_key` (a private copy
of the config, mode 0600, deleted on exit), then runs `serve run` on that copy. Without the variable it runs
`serve run` on the config as it is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

import yaml

API_KEY_ENV = "NANOVLLM_API_KEY"  # deployments.app reads the same variable where it builds the app
IMPORT_PATH = "deployments.app:build_app"


def fold_api_key(config: dict[str, Any], key: str) -> int:
    """Set `api_key` on every nanovllm application that does not set one; returns how many it set."""
    n = 0
    for app in config.get("applications") or []:
        if app.get("import_path") == IMPORT_PATH:
            args = app.setdefault("args", {}) or {}
            app["args"] = args
            if args.get("api_key") is None:
                args["api_key"] = key
                n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    config_path, rest = argv[0], argv[1:]
    serve_run = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()", "run"]
    key = os.environ.get(API_KEY_ENV)
    if not key:
        return subprocess.call([*serve_run, config_path, *rest])
    with open(config_path) as f:
        config = yaml.safe_load(f)
    n = fold_api_key(config, key)
    print(f"{API_KEY_ENV} is set: every /v1/* request to {n} application(s) needs it", flush=True)
    # The copy sits next to the original: relative paths in it (the model) mean the same thing.
    fd, path = tempfile.mkstemp(prefix=".launch-", suffix=".yaml", dir=os.path.dirname(os.path.abspath(config_path)))
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp made it 0600
            yaml.safe_dump(config, f)
        return subprocess.call([*serve_run, path, *rest])
    except KeyboardInterrupt:
        return 130
    finally:
        os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
