"""`python -m doit`, with Ctrl-C handled: the dashboard starts runs through this.

A process started from a background shell (nohup, `&`, some CI runners and service managers)
inherits SIGINT as ignored, and Python then leaves it ignored; so would doit, and the
dashboard's stop (SIGINT first, so doit records what finished and saves its dep DB) would only
land as SIGTERM, losing that. Restoring the handler here also gives every task's process a
default SIGINT again (a handled signal resets on exec).
"""
import signal

from doit.doit_cmd import DoitMain

if __name__ == "__main__":
    import sys

    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(DoitMain().run(sys.argv[1:]))
