# Dispatch: what the core knows of a running service, and its loop guard.

cdef double BLOCKED_LOOP_WARNING = 0.1


cdef inline void _warn_if_blocked(str service, str fun, double started):
    # A plain def runs on the loop: one that holds it past 100 ms is named.
    cdef double took = _now() - started
    if took > BLOCKED_LOOP_WARNING:
        _log.warning("malla: %s.%s blocked the event loop for %.0f ms (make it "
                     "async def, or @malla.blocking to run it in a thread)",
                     service, fun, took * 1000)


def warn_if_blocked(str service, str fun, double started):
    """Log a function that held the event loop for more than 100 ms."""
    _warn_if_blocked(service, fun, started)


# ---------------------------------------------------------------------------
# ServiceEntry: what dispatch needs to know of one running service
# ---------------------------------------------------------------------------

cdef class ServiceEntry:
    """A running service as the dispatcher sees it (built by malla.service).

    `funcs` maps exported names to bound methods, `kinds` to 0 (plain def),
    1 (async def) or 2 (@blocking).  `fast` is true when the service keeps the
    default service_cb_in: plain functions are then called by the core
    directly; everything else goes through `dispatch()`, which the Python
    subclass implements.
    """

    def __init__(self, str name, dict funcs, dict kinds, bint fast, int max_concurrency,
                 dict checks=None):
        self.name = name
        self.funcs = funcs
        self.kinds = kinds
        # `checks` (malla.arguments.Checker per function) bounds the
        # positional arguments of the common call, checked here in C; the
        # rest (keywords, mismatches) goes to the checker itself
        self.checks = checks if checks is not None else {}
        self.arity = {fun: (c.lo, c.hi) for fun, c in self.checks.items()}
        self.fast = fast
        self.paused = False
        self.running = 0
        self.max_concurrency = max_concurrency

    def dispatch(self, proto, sid, fun, fn, args, kwargs, timeout, deadline, meta, cast,
                 trace):
        raise NotImplementedError
