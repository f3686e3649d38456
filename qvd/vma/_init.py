"""
A minimal init for when the VMA is PID 1 (a container with no init system).

    become_init_if_pid1()     # returns in the child, which runs the VMA

PID 1 must reap every orphan (the session's processes are reparented to it)
and Twisted only reaps its own children, so the process forks: the child runs
the VMA, the parent stays PID 1, reaps everything, passes SIGTERM, SIGINT,
SIGHUP, SIGUSR1 and SIGUSR2 on to the VMA (SIGPWR, lxc-stop's default halt
signal, as SIGTERM) and exits with the VMA's status.
"""

import os
import signal

_FORWARD = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT,
            signal.SIGHUP: signal.SIGHUP, signal.SIGUSR1: signal.SIGUSR1,
            signal.SIGUSR2: signal.SIGUSR2, signal.SIGPWR: signal.SIGTERM}


def become_init_if_pid1():
    if os.getpid() != 1:
        return
    child = os.fork()
    if child == 0:
        return
    _reap_forever(child)


def _reap_forever(child):
    def forward(signum, frame):
        try:
            os.kill(child, _FORWARD[signum])
        except ProcessLookupError:
            pass
    for signum in _FORWARD:
        signal.signal(signum, forward)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)
