#!/usr/bin/env python
"""A Channels 1.1.8 project with one consumer that does nothing, on channel `bench.noop`:
the Python side of the worker dispatch benchmark (scripts/bench-server.sh). Runs in the peers'
venv1; PEERS_DIR names ../shared/peers, whose py311compat shim makes Django 1.11 run on 3.11."""
import os
import sys

sys.path.insert(0, os.path.join(os.environ["PEERS_DIR"], "channels1"))
import py311compat  # noqa: F401,E402  (before Django)

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "noopproj.settings")
    from django.core.management import execute_from_command_line
    execute_from_command_line(sys.argv)
