"""The tests' deadline-bounded line reader (``proc_support.read_line``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from proc_support import read_line

CHILD = r"""
import sys, time
sys.stdout.write("one\ntw"); sys.stdout.flush()
sys.stderr.write("err line\n"); sys.stderr.flush()
time.sleep(0.2)
sys.stdout.write("o\n"); sys.stdout.flush()
sys.stderr.write("silent now"); sys.stderr.flush()
time.sleep(60)
"""


def test_read_line_reads_whole_lines_from_either_pipe_and_fails_a_silent_child_with_its_stderr():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert read_line(proc) == "one\n"                       # nothing beyond the line is taken
        lines = {read_line(proc, proc.stdout, proc.stderr), read_line(proc, proc.stdout, proc.stderr)}
        assert lines == {"two\n", "err line\n"}                 # a line begun earlier is finished
        with pytest.raises(pytest.fail.Exception, match="(?s)no line within 0.5 s.*stderr: .silent now"):
            read_line(proc, timeout=0.5)                       # a bound on a hang, not a timing assertion
        assert proc.poll() is not None                         # killed, not left behind
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_reaped_kills_and_waits_for_a_child_the_block_leaves_running():
    from proc_support import reaped
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdout=subprocess.PIPE)
    with pytest.raises(AssertionError), reaped(proc) as p:
        assert p is proc
        raise AssertionError("a failed assertion inside the block")
    assert proc.returncode is not None and proc.stdout.closed      # killed, waited for, pipes closed


def test_wait_for_eof_drains_until_the_peer_closes_and_bounds_a_peer_that_never_does():
    import socket

    from proc_support import wait_for_eof
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        b.sendall(b"x" * 100)
        b.shutdown(socket.SHUT_WR)
        wait_for_eof(a.fileno(), timeout=60)               # data, then the end: returns
        c, d = socket.socketpair()
        try:
            with pytest.raises(TimeoutError, match="did not close its side within 0.2 s"):
                wait_for_eof(c.fileno(), timeout=0.2)      # an open, silent peer: a bounded wait
        finally:
            c.close()
            d.close()
    finally:
        a.close()
        b.close()
