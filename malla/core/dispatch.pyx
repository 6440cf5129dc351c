# Dispatch: an incoming call, the one rule set it must pass before it runs
# (on every path: the network's and in-process calls), the service it runs in.

cdef double BLOCKED_LOOP_WARNING = 0.1
# Distinct callers whose allow= verdicts a service keeps (then it starts anew)
cdef Py_ssize_t VERDICT_CALLERS = 1024
# The weight of the newest handler time in a service's recent mean (about
# the last 8 calls' worth of history)
cdef double HANDLER_WEIGHT = 0.125
cdef int64_t MAX_RETRY_AFTER_MS = mexc.MAX_RETRY_AFTER_MS


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
# IncomingCall: one decoded CALL or CAST
# ---------------------------------------------------------------------------

@cython.freelist(32)
cdef class IncomingCall:
    """A call from the peer, decoded and well-formed (what `dispatch` and the
    serving side's hook see of it)."""

    def __repr__(self):
        return f"<IncomingCall {self.sid} {self.service}.{self.fun}>"


cdef IncomingCall _incoming_call(object obj, uint64_t sid, uint8_t ftype):
    # A CALL message: [service, fun, args, kwargs, timeout, deadline, meta,
    # trace?] (docs/protocol.md), a STREAM's with its window after them.
    # None when it is malformed.
    cdef list msg
    cdef IncomingCall call
    cdef bint cast = ftype == FT_CAST
    cdef object window = None
    if type(obj) is not list or PyList_GET_SIZE(obj) < 7:
        return None
    if ftype == FT_STREAM:
        window = obj[8] if PyList_GET_SIZE(obj) > 8 else None
        if type(window) is not int or not 0 < window <= MAX_STREAM_WINDOW:
            return None
    msg = <list>obj
    service, fun, args, kwargs = msg[0], msg[1], msg[2], msg[3]
    if (type(service) is not str or type(fun) is not str or type(args) is not list
            or (kwargs is not None and type(kwargs) is not dict)):
        return None
    call = IncomingCall.__new__(IncomingCall)
    call.sid = sid
    call.cast = cast
    call.service = <str>service
    call.fun = <str>fun
    call.args = <list>args
    call.kwargs = <dict>kwargs if kwargs else None
    call.timeout = msg[4]
    call.deadline = msg[5]
    call.meta = msg[6]
    call.trace = msg[7] if PyList_GET_SIZE(msg) > 7 else None
    call.window = window if window is not None else 0
    return call
# ---------------------------------------------------------------------------
# CallContext: the call a handler serves (malla.current_call())
# ---------------------------------------------------------------------------

# The one context variable of a served call: its CallContext, or None outside
# any call.  The caller's side reads its deadline (calls a handler makes
# inherit the budget); malla.context reads the rest.
cdef object _current_call = contextvars.ContextVar("malla_call", default=None)
CURRENT_CALL = _current_call


@cython.final
@cython.freelist(32)
cdef class CallContext:
    """The call the running handler serves (``malla.current_call()``): who
    called (`caller`, a node name), `service` and `function`, the caller's
    `meta`, its `timeout` (ms, as sent; 0 for a cast), the absolute deadline
    `deadline_at` (time.monotonic() seconds, None without one), whether it
    came `in_process` (from this node, not over the network) and whether it
    is a `cast`.  Immutable."""

    def __init__(self, str caller, str service, str function, meta=None, timeout=None,
                 deadline_at=None, bint in_process=False, bint cast=False):
        self.caller = caller
        self.service = service
        self.function = function
        self.meta = meta
        self.timeout = timeout
        self.deadline_at = None if deadline_at is None else float(deadline_at)
        self.in_process = in_process
        self.cast = cast

    def remaining_ms(self):
        """Milliseconds left of the call's budget, read from the clock now
        (negative once spent); None when the call has no deadline."""
        if self.deadline_at is None:
            return None
        return (<double>self.deadline_at - _now()) * 1000.0

    def __repr__(self):
        return (f"<CallContext {self.service}.{self.function} from {self.caller}"
                f"{' in-process' if self.in_process else ''}{' cast' if self.cast else ''}>")


cdef CallContext _call_context(str caller, str service, str function, object meta,
                               object timeout, object deadline_at, bint in_process, bint cast):
    cdef CallContext ctx = CallContext.__new__(CallContext)
    ctx.caller = caller
    ctx.service = service
    ctx.function = function
    ctx.meta = meta
    ctx.timeout = timeout
    ctx.deadline_at = deadline_at
    ctx.in_process = in_process
    ctx.cast = cast
    return ctx


cdef inline CallContext _inline_context(str caller, IncomingCall call):
    # The context of a call the core runs inline (it has no deadline there).
    return _call_context(caller, call.service, call.fun, call.meta, call.timeout, None,
                         False, call.cast)


# The call the core runs inline on this thread right now (borrowed from the
# running _run_inline, which restores the outer values), or NULL.  A plain
# def runs there synchronously, so a thread's slot is its context; it is
# what keeps the inline path free of a context variable's set and reset.
cdef extern from *:
    """
    static __thread PyObject *malla_inline_call = NULL;
    static __thread PyObject *malla_inline_caller = NULL;
    """
    PyObject* malla_inline_call
    PyObject* malla_inline_caller


def current_call():
    """The CallContext of the call being served on this thread, or None."""
    if malla_inline_call is not NULL:
        return _inline_context(<str><object>malla_inline_caller,
                               <IncomingCall><object>malla_inline_call)
    return _current_call.get()


def enter_call(str caller, str service, str function, meta, timeout, deadline_at,
               bint in_process, bint cast):
    """Make the call a handler serves the current one (`deadline_at`:
    time.monotonic() seconds or None); the token to reset when it is done."""
    if deadline_at is not None:
        deadline_at = float(deadline_at)
    return PyContextVar_Set(_current_call, _call_context(
        caller, service, function, meta, timeout, deadline_at, in_process, cast))


def leave_call(token):
    """Back to the context before enter_call() returned `token`."""
    PyContextVar_Reset(_current_call, token)


def inherited_deadline():
    """The deadline (time.monotonic() seconds) of the call being served, or None."""
    if malla_inline_call is not NULL:
        return None
    cdef object call = _current_call.get()
    return None if call is None else (<CallContext>call).deadline_at


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
                 dict checks=None, allow=None):
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
        # `allow` (malla.authz.Policy) says who may call which function;
        # None (the default) costs the hot path one comparison
        self.allow = allow
        self._verdicts = {}
        self.mean_time = 0.0

    def handled(self, double seconds):
        """A call that held a place under max_concurrency ended after
        `seconds`: it moves the recent mean handler time, an exponentially
        weighted mean (the newest call weighs HANDLER_WEIGHT)."""
        if self.mean_time == 0.0:
            self.mean_time = seconds
        else:
            self.mean_time += HANDLER_WEIGHT * (seconds - self.mean_time)

    cdef object _retry_after_ms(self):
        # Overloaded's hint (DESIGN.md "Overloaded.retry_after_ms"): the calls
        # waiting beyond max_concurrency (this one and any past the limit)
        # x the recent mean handler time / max_concurrency -- when that many
        # places free up, running calls ending at an even pace -- rounded to
        # whole ms, at least 1 (no history yet: 1), at most a day
        cdef double waiting = self.running - self.max_concurrency + 1
        cdef double ms = waiting * self.mean_time * 1000.0 / self.max_concurrency
        if ms < 1.0:
            return 1
        return min(<int64_t>(ms + 0.5), MAX_RETRY_AFTER_MS)

    cdef tuple _refusal(self, str fun, object args, dict kwargs, object deadline, str caller):
        # The one rule set of a call to this service, in order: running (not
        # paused), the function exported, the caller allowed to call it (its
        # node name: the peer's, or this node's own in-process), the
        # arguments fit its signature (positional ones in C, the rest by its
        # checker), the caller's budget well-formed and not spent, a place
        # under max_concurrency.  None: it runs; otherwise (wire error code,
        # error class, message[, retry_after_ms]).
        cdef PyObject* ap
        cdef Py_ssize_t nargs
        cdef str denied
        if self.paused:
            return (ERR_SERVICE_NOT_AVAILABLE, "malla.exceptions.ServiceNotAvailable",
                    f"service {self.name} is not available on this node")
        if PyDict_GetItem(self.funcs, fun) is NULL:
            return (ERR_UNKNOWN_FUNCTION, "malla.exceptions.UnknownFunction",
                    f"service {self.name} exports no function {fun!r}")
        if self.allow is not None:
            denied = self._denial(fun, caller)
            if denied is not None:
                return (ERR_FORBIDDEN, "malla.exceptions.Forbidden", denied)
        ap = PyDict_GetItem(self.arity, fun)
        nargs = PyList_GET_SIZE(args) if type(args) is list else len(args)
        if ap is not NULL and (kwargs or not (<Py_ssize_t>(<tuple>ap)[0] <= nargs
                                              <= <Py_ssize_t>(<tuple>ap)[1])):
            try:
                self.checks[fun].check(args, kwargs)
            except BadArguments as exc:
                return (ERR_BAD_ARGUMENTS, "malla.exceptions.BadArguments", str(exc))
        # a budget in ms (docs/protocol.md): a number, finite, within 64 bits
        if deadline is not None and ((type(deadline) is not int and type(deadline) is not float)
                                     or not -1e19 < deadline < 1e19):
            return (ERR_BAD_REQUEST, "malla.exceptions.ProtocolError", "malformed call message")
        if deadline is not None and deadline <= 0:
            return (ERR_DEADLINE, "malla.exceptions.CallTimeout",
                    "deadline passed before the call started")
        if self.running >= self.max_concurrency:
            return (ERR_OVERLOADED, "malla.exceptions.Overloaded",
                    f"service {self.name} is at max_concurrency {self.max_concurrency}",
                    self._retry_after_ms())
        return None

    def refusal(self, str fun, args, kwargs=None, deadline=None, str caller=None):
        """Why this service does not take a call of `fun` from the node
        named `caller` now, as (wire error code, error class, message), with
        Overloaded's retry_after_ms as a 4th element; None when it may run.
        The in-process path asks this, as the core does for every call that
        arrives (one rule set)."""
        if kwargs is not None and type(kwargs) is not dict:
            kwargs = dict(kwargs)       # (any mapping, as ** takes it)
        return self._refusal(fun, args, kwargs, deadline, caller)

    cdef str _denial(self, str fun, str caller):
        # None when `caller` may call `fun`; otherwise the Forbidden message
        # (the policy logs and counts the refusal).  The verdict is cached
        # per (caller, function): fnmatch runs once per pair, not per call;
        # the cache holds at most VERDICT_CALLERS callers, then starts anew.
        cdef PyObject* funs = PyDict_GetItem(self._verdicts, caller)
        cdef PyObject* verdict = NULL
        cdef object allowed
        if funs is not NULL:
            verdict = PyDict_GetItem(<object>funs, fun)
        if verdict is not NULL:
            allowed = <object>verdict
        else:
            if funs is NULL:
                if PyDict_Size(self._verdicts) >= VERDICT_CALLERS:
                    self._verdicts.clear()
                self._verdicts[caller] = {}
            allowed = True if self.allow.permits(fun, caller) else False
            self._verdicts[caller][fun] = allowed
        if allowed is True:
            return None
        return self.allow.denied(self.name, fun, caller)

    def denial(self, str fun, str caller):
        """None when the node named `caller` may call `fun` (allow=, or no
        rule); otherwise the Forbidden message, the refusal logged and
        counted (local() asks this: it takes no other rule).  An unexported
        `fun` is not this check's to refuse (nor to cache): None."""
        if self.allow is None or PyDict_GetItem(self.funcs, fun) is NULL:
            return None
        return self._denial(fun, caller)

    def dispatch(self, proto, IncomingCall call):
        """Run `call` (admitted) as a task; the Python subclass does."""
        raise NotImplementedError
