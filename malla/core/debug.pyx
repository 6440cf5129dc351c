# The debug build's leak counters and invariant checks (`make debug`).
#
# Compiled in only with MALLA_DEBUG defined: in a normal build the C compiler
# drops every `if MALLA_DEBUG_BUILD:` branch, so they cost nothing.  The test
# suite's teardown asserts them (tests/conftest.py) when it runs on the
# debug build (`make test-debug`).

import weakref

DEBUG = bool(MALLA_DEBUG_BUILD)

# every protocol object alive (debug build only): what they still hold is
# summed on demand, so the hot path counts nothing
cdef object _live = weakref.WeakSet()
cdef Py_ssize_t _violations = 0


cdef void _debug_violation(str what) noexcept:
    # An invariant of the core broke: counted (the teardown asserts none)
    # and logged; never raised inside a loop callback.
    global _violations
    _violations += 1
    _log.error("malla core (debug build): invariant broken: %s", what)


def debug_counters():
    """What the protocol objects alive still hold, summed: protocols,
    connections still open, calls pending, calls running, large messages
    queued, messages half arrived, streams open (either way), invariant
    violations.  After every node
    has stopped, each must be 0.  Empty in a normal build."""
    if not MALLA_DEBUG_BUILD:
        return {}
    protos = list(_live)
    return {
        "protocols": len(protos),
        "open": sum(1 for p in protos if p.transport is not None),
        "pending": sum(p.debug_held()[0] for p in protos),
        "running": sum(p.debug_held()[1] for p in protos),
        "queued_large": sum(p.debug_held()[2] for p in protos),
        "partial": sum(p.debug_held()[3] for p in protos),
        "streams": sum(p.debug_held()[4] for p in protos),
        "violations": _violations,
    }
