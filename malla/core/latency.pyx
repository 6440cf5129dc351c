# LatencyBook: the latency average of each service on one peer, learnt from
# this side's own calls over the connection (sans-IO), for the balancer
# (malla/balance.py, DESIGN.md "Routing and resilience").
#
# Kept here, in the core, because it is fed by every call: the send time is
# stamped where the call is queued and the reply matched where it arrives,
# in C, with no Python frame per call.  The formulas:
#
# - read at t: avg x 2^(-(t - at) / HALF_LIFE): an idle node's average halves
#   every 10 s, so a node that was slow and is no longer chosen soon looks
#   as cheap as the others and is tried, and re-measured, again;
# - a sample x at t, v the value read at t (0 before the first): avg = x
#   when x > v (peak: a node
#   that turns slow is avoided from its first slow reply), else v + ALPHA
#   (x - v) (a recovery is believed over a few replies);
# - a failed attempt (CallTimeout, Overloaded; malla/outcome.py) counts as
#   max(x, 2v): a node that fails fast never looks fast;
# - a hedged copy that lost the race (cancelled) took at least x: only a
#   bound, so avg = x when x > v, else nothing changes (as an ordinary
#   sample it would pull a stalling node's peak down towards the hedge
#   delay each time it loses, and p2c would send it calls again: measured,
#   a node stalling 4 % of its calls for 200 ms then took 20 % of the
#   first copies);
# - a service not measured on a node yet reads as the service's mean over
#   every node of this process (neither favoured nor avoided; 0 before any
#   sample, when in-flight alone decides);
# - cost = max(read, 1 us) x (calls in flight to the node + 1): each call
#   already waiting there is expected to take about its latency;
# - but a pair's node whose base is more than GAP times the other's typical
#   reply (a running estimate of its median: up or down by MED_STEP with
#   each reply that counts for the base) loses
#   the pair whatever the calls in flight, unless it was sent no call of
#   the service for PROBE seconds (then the costs decide): a handler that
#   runs its calls concurrently takes about as long with ten in flight as
#   with none, so the in-flight factor of busy fast nodes would otherwise
#   outweigh a 20x slower node's latency, and that node would take a call
#   whenever it has none in flight (about 1 % of the calls at 32 callers
#   under load, the p99; measured, docs/performance.md).  A node far
#   slower than the other of its pair is thus re-probed at most every
#   PROBE seconds; once idle, its decaying average makes it win a pair on
#   cost when a probe is due, and a reply as fast as the others' brings its
#   base back at once;
# - the base is the fastest of the node's last LOW_REPLIES to twice that
#   many replies (failures, a handler's exceptions and hedged copies that
#   lost do not count).  Counted in replies, not seconds: a minimum over a
#   time window compares a busy node's thousands of replies with the few of
#   a node held to a probe each PROBE seconds, and the lowest of thousands
#   is lower -- two equal nodes then held one of them off for seconds (a
#   review measured it).  The peak is what a call should
#   expect; the base what the node does when this side is not in its way: a
#   stall of this process (a CPU shared with others, a long callback)
#   delays every reply it was waiting for, and the peaks of every fast node
#   with calls in flight then rise towards a slow node's latency, but their
#   bases keep the replies before the stall (measured: with the peaks, or
#   with an average that rises slowly, which the burst of delayed replies
#   of 20 calls in flight moved anyway, such stalls still let a 10x slower
#   node take 1 to 2 % of the calls).

from libc.math cimport exp, log, INFINITY
from libc.stdlib cimport qsort

cdef double HALF_LIFE = 10.0
cdef double _RATE = log(2.0) / HALF_LIFE
cdef double _ALPHA = 0.25
cdef double _FLOOR = 1e-6
cdef double GAP = 2.5
cdef double PROBE = 0.2
cdef int LOW_REPLIES = 32
# The median estimate moves by 5 % a reply: a stall of this process that
# delays 20 replies in flight moves it 2.7x at most, so a 20x slower node
# still loses its pairs; 16 replies follow a change of 2x.  Against the
# other's base, not its median, two equal nodes with a few fast replies
# (a cheap error, a cache hit) held one another off (a review measured it).
cdef double MED_STEP = 1.05
# sent calls remembered per connection: a call whose slot a later one took
# (more than this many in flight) gives no sample, nothing else.  6 KiB,
# allocated with the connection's first call: a connection that never
# calls (a stranger's, refused in its handshake) costs none of it
cdef Py_ssize_t _RING = 256

# the outcomes of malla/outcome.py
OUTCOME_OK = 0
OUTCOME_FAILED = 1
OUTCOME_IGNORED = 2
# answered in time with the handler's exception: an average's sample, not
# the base's (a quick KeyError says nothing of what a call costs there)
OUTCOME_RAISED = 3

# service -> its mean over every node this process calls
cdef dict _MEANS = {}


@cython.final
cdef class ServiceMean:
    pass


@cython.final
cdef class Latency:
    """One (peer, service): its latency average, in seconds."""

    def __cinit__(self):
        self.avg = 0.0
        self.at = 0.0
        self.sent_at = -INFINITY
        self.low = self.low_prev = INFINITY
        self.low_n = 0
        self.med = 0.0
        self.sampled = False

    cdef double read(self, double now) noexcept:
        if not self.sampled:
            return self.mean.value if self.mean.sampled else 0.0
        return self._decayed(now)

    cdef inline double _decayed(self, double now) noexcept:
        # its own average as it reads at `now` (sampled only)
        return self.avg * exp(-(now - self.at) * _RATE)

    cdef int at_least(self, double seconds, double now) except -1:
        cdef double v = self._decayed(now) if self.sampled else 0.0
        if seconds > v:
            self.avg = seconds
            self.at = now
            self.sampled = True
        return 0

    cdef inline void _low(self, double seconds) noexcept:
        # the fastest reply of this window of LOW_REPLIES and of the one
        # before (the base)
        if self.low_n >= LOW_REPLIES:
            self.low_prev = self.low
            self.low = seconds
            self.low_n = 1
        else:
            if seconds < self.low:
                self.low = seconds
            self.low_n += 1

    cdef inline double base(self) noexcept:
        # (INFINITY before a reply that counts)
        return self.low if self.low < self.low_prev else self.low_prev

    cdef int sample(self, double seconds, bint failed, double now,
                    bint base=True) except -1:
        # (a first sample is taken as it is: the service's mean is what an
        # unmeasured node reads as, not a prior its own replies must undo)
        cdef double v = self._decayed(now) if self.sampled else 0.0
        if seconds < 0:
            seconds = 0
        if base and not failed:
            self._low(seconds)
            if self.med <= 0.0:
                self.med = seconds if seconds > _FLOOR else _FLOOR
            elif seconds > self.med:
                self.med *= MED_STEP
            elif seconds < self.med:
                self.med /= MED_STEP
        if failed and seconds < 2 * v:
            seconds = 2 * v
        self.avg = seconds if seconds > v else v + _ALPHA * (seconds - v)
        self.at = now
        self.sampled = True
        if self.mean.sampled:
            self.mean.value += _ALPHA * (seconds - self.mean.value)
        else:
            self.mean.value = seconds
            self.mean.sampled = True
        return 0


@cython.final
cdef class LatencyBook:
    """Per connection: service -> Latency, and the ring of calls sent (stream
    id, send time, whose Latency) that a reply or an error is matched with."""

    def __cinit__(self, Pending pending=None):
        self.by_service = {}
        self._pending = pending
        self._ring = NULL

    def __dealloc__(self):
        PyMem_Free(self._ring)

    cdef Latency of(self, str service):
        cdef PyObject* p = PyDict_GetItem(self.by_service, service)
        cdef Latency lat
        cdef PyObject* m
        if p is not NULL:
            return <Latency>p
        lat = Latency()
        m = PyDict_GetItem(_MEANS, service)
        if m is NULL:
            lat.mean = ServiceMean()
            _MEANS[service] = lat.mean
        else:
            lat.mean = <ServiceMean>m
        self.by_service[service] = lat
        return lat

    cdef double sent(self, uint64_t sid, str service) except -1:
        """Call `sid` to `service` was queued now; returns now."""
        cdef double now = _now()
        cdef SentCall* slot
        cdef Latency lat = self.of(service)
        if self._ring is NULL:
            self._ring = <SentCall*>PyMem_Calloc(_RING, sizeof(SentCall))
            if self._ring is NULL:
                raise MemoryError()
        slot = &self._ring[(sid >> 1) & (_RING - 1)]
        slot.sid = sid
        slot.sent = now
        # (borrowed: by_service keeps every Latency while the book lives)
        slot.lat = <PyObject*>lat
        lat.sent_at = now
        return now

    cdef int ended(self, uint64_t sid, int outcome) except -1:
        cdef SentCall* slot
        cdef double now
        if self._ring is NULL:
            return 0
        slot = &self._ring[(sid >> 1) & (_RING - 1)]
        if slot.sid != sid:
            return 0
        slot.sid = 0
        if outcome != OUTCOME_IGNORED:
            now = _now()
            (<Latency>slot.lat).sample(now - slot.sent, outcome == OUTCOME_FAILED, now,
                                       outcome != OUTCOME_RAISED)
        return 0

    cdef int refused(self, uint64_t sid, object err) except -1:
        # what an ERROR says of the peer (malla/outcome.py): a handler's
        # exception was answered in time, Overloaded is the node's own
        # fault, a refusal (not running there, a spent deadline, a bad call)
        # says nothing of it
        return self.ended(sid, OUTCOME_RAISED if isinstance(err, mexc.RemoteError) else
                          OUTCOME_FAILED if isinstance(err, mexc.Overloaded) else
                          OUTCOME_IGNORED)

    cdef double cost_of(self, str service, Py_ssize_t in_flight, double now):
        cdef Seen seen
        self.seen(service, in_flight, now, &seen)
        return seen.cost

    cdef int seen(self, str service, Py_ssize_t in_flight, double now, Seen* out) except -1:
        # what the balancer reads of `service` on this peer: cost, base
        # (floored), when it last sent it a call
        cdef PyObject* p = PyDict_GetItem(self.by_service, service)
        cdef Latency lat
        cdef double v, b, t
        cdef PyObject* m
        if p is not NULL:
            lat = <Latency>p
            v = lat.read(now)
            b = lat.base()
            if b == INFINITY:
                b = v
            t = lat.med if lat.med > 0.0 else b
            out.sent = lat.sent_at
        else:
            m = PyDict_GetItem(_MEANS, service)
            v = b = t = (<ServiceMean>m).value if m is not NULL else 0.0
            out.sent = -INFINITY
        if v < _FLOOR:
            v = _FLOOR
        out.base = b if b > _FLOOR else _FLOOR
        out.typical = t if t > _FLOOR else _FLOOR
        out.cost = v * (in_flight + 1)
        out.in_flight = in_flight
        return 0

    # -- for tests and stats (the clock given, so formulas can be checked) ----

    def sample(self, str service, double seconds, bint failed, double now,
               bint raised=False):
        """Record one attempt's time as the core does (`raised`: answered
        with the handler's exception)."""
        self.of(service).sample(seconds, failed, now, not raised)

    def mark_sent(self, str service, double now):
        """Record that a call to `service` was sent at `now`, as the core
        does when it queues one."""
        self.of(service).sent_at = now

    def at_least(self, str service, double seconds, double now):
        """An attempt to `service` took at least `seconds` (a hedged copy
        cancelled unanswered): its average rises to that, never falls."""
        self.of(service).at_least(seconds, now)

    def base(self, str service):
        """The service's base latency on this peer (the gap rule's), seconds:
        its fastest reply of this window of replies and the one before; the
        mean before any."""
        cdef Latency lat = self.of(service)
        cdef double b = lat.base()
        return lat.read(0.0) if b == INFINITY else b

    def latency(self, str service, double now):
        """The service's latency average on this peer at `now`, seconds."""
        return self.of(service).read(now)

    def cost(self, str service, in_flight=None, now=None):
        """What one more call to `service` costs on this peer: its latency
        average there times (our calls in flight to it + 1)."""
        return self.cost_of(
            service, PyDict_Size(self._pending.calls) if in_flight is None else in_flight,
            _now() if now is None else now)


def forget_means():
    """Forget every service's mean (tests: start from nothing)."""
    _MEANS.clear()


# -- the p2c order of one call (malla/balance.py says why) -----------------------

cdef struct Ranked:
    double cost
    Py_ssize_t index


cdef int _by_cost(const void* a, const void* b) noexcept nogil:
    cdef const Ranked* x = <const Ranked*>a
    cdef const Ranked* y = <const Ranked*>b
    if x.cost < y.cost:
        return -1
    if x.cost > y.cost:
        return 1
    return (x.index > y.index) - (x.index < y.index)     # ties: the registry's order


cdef double _unconnected(str service, bint dial):
    # In the full mesh a node without an admitted connection cannot take the
    # call (+inf: any connected one first).  With connections on demand it
    # can, after a dial: it costs what two calls to an idle node of the
    # service cost on average, so a fresh node beats a connected one with a
    # call in flight, and an open connection wins a tie (a caller does not
    # open a connection to every node for nothing).
    cdef PyObject* m
    cdef double v
    if not dial:
        return INFINITY
    m = PyDict_GetItem(_MEANS, service)
    v = (<ServiceMean>m).value if m is not NULL else 0.0
    return 2.0 * (v if v > _FLOOR else _FLOOR)


cdef int _seen_on(dict conns, object node, str service, double now, bint dial,
                  Seen* out) except -1:
    # a node without a connection has no latency of its own (-1: the pair's
    # latency gap does not apply to it)
    cdef PyObject* c = PyDict_GetItem(conns, node)
    cdef object proto = (<object>c).proto if c is not NULL else None
    cdef LatencyBook book
    if proto is None or not isinstance(proto, CoreProtocol):
        out.cost = _unconnected(service, dial)
        out.base = out.typical = -1.0
        out.sent = -INFINITY
        out.in_flight = 0
        return 0
    book = (<CoreProtocol>proto).latency
    return book.seen(service, PyDict_Size(book._pending.calls), now, out)


cdef double _cost_on(dict conns, object node, str service, double now, bint dial):
    cdef Seen seen
    _seen_on(conns, node, service, now, dial, &seen)
    return seen.cost


cdef inline bint _far_slower(Seen* a, Seen* b, double now) noexcept:
    # a loses the pair to b whatever the calls in flight (GAP, PROBE above)
    return (b.base > 0 and a.base > GAP * b.typical
            and now - a.sent < PROBE)


cdef inline bint _first_wins(Seen* a, Seen* b, double now) noexcept:
    if _far_slower(a, b, now):
        return False
    if _far_slower(b, a, now):
        return True
    return a.cost <= b.cost


@cython.final
cdef class Ranking:
    """The nodes one call tries, in order, computed as far as it goes: the
    local node, the better of a random remote pair, then (only when the call
    fails over) the other remote nodes cheapest first."""

    cdef list _order
    cdef dict _conns
    cdef str _service
    cdef Py_ssize_t _start, _best, _step, _k
    cdef Ranked* _rest
    cdef Py_ssize_t _n_rest
    cdef bint _dial

    def __dealloc__(self):
        PyMem_Free(self._rest)

    def __iter__(self):
        return self

    def __next__(self):
        cdef Py_ssize_t step = self._step
        self._step += 1
        if step == 0 and self._start:
            return self._order[0]
        if step <= self._start:
            return self._order[self._best]
        if self._rest is NULL:
            self._rank_rest()
        self._k += 1
        if self._k > self._n_rest:
            raise StopIteration
        return self._order[self._rest[self._k - 1].index]

    cdef int _rank_rest(self) except -1:
        cdef Py_ssize_t n = len(self._order), i, j = 0
        cdef double now = _now()
        self._rest = <Ranked*>PyMem_Malloc((n + 1) * sizeof(Ranked))
        if self._rest is NULL:
            raise MemoryError()
        for i in range(self._start, n):
            if i == self._best:
                continue
            self._rest[j].index = i
            # (every cost read at one time, the pair's loser's too: read
            # apart, two equal averages decay by different amounts)
            self._rest[j].cost = _cost_on(self._conns, self._order[i], self._service, now,
                                          self._dial)
            j += 1
        self._n_rest = j
        qsort(self._rest, j, sizeof(Ranked), _by_cost)
        return 0


# With connections on demand (mesh="on_demand") a pair drawn from every node
# of a large service is almost always two nodes this caller has no
# connection to, so nearly every call dialled a new node (measured: 1,000
# nodes calling 125-node services opened a connection per call, and their
# handshakes took both CPUs).  So the pair is drawn from this caller's
# window of the service: the APERTURE nodes of highest score, a hash of the
# node's name salted per P2COrder (rendezvous: stable while they stay,
# spread evenly over the callers, and a node that joins or leaves changes
# one place of the window at most).  When the pair's winner has calls
# waiting, it then meets one node drawn from all of them, which takes the
# call only when it is cheaper (a fresh node costs twice the service's
# mean): an idle window keeps the calls (one slow reply there loses to the
# window's other node, never to a new connection: a peak average sits above
# the mean, and with idle winners compared too the calls dialled more, at
# 1.6 to 3.2x fewer calls/s up to 240 nodes in make scale) and a window whose
# nodes have calls waiting spreads them beyond it (as Finagle's aperture
# balancer grows its window).
cdef enum:
    APERTURE = 4


cdef inline uint64_t _mix(uint64_t x) noexcept:
    # splitmix64's finaliser: a name's hash spread over 64 bits
    x ^= x >> 30
    x *= <uint64_t>0xbf58476d1ce4e5b9ULL
    x ^= x >> 27
    x *= <uint64_t>0x94d049bb133111ebULL
    x ^= x >> 31
    return x


@cython.final
cdef class _Window:
    # the window of one service: the order it was computed from (the
    # registry's list, the same object until its nodes change) and the
    # indices of its APERTURE best-scored remote nodes in it
    cdef list order
    cdef Py_ssize_t length   # len(order) then: a list shortened in place is not reused
    cdef Py_ssize_t n
    cdef Py_ssize_t idx[APERTURE]


@cython.final
cdef class P2COrder:
    """`Node(balance="p2c")`'s node order: called with a service, the nodes
    a call tries (the registry's `nodes(service)`, local first, re-ranked).
    `nodes` returns a new list whenever the nodes change (the registry's
    does): the window of a service is kept while the list is the same."""

    cdef object _nodes
    cdef dict _conns
    cdef str _local
    cdef uint64_t _state
    cdef uint64_t _salt
    cdef bint _dial
    cdef dict _windows

    def __init__(self, nodes, dict conns, str local, uint64_t seed=0, bint dial=False):
        # dial: nodes without a connection can take calls (mesh="on_demand")
        self._nodes = nodes
        self._conns = conns
        self._local = local
        self._dial = dial
        self._state = seed or int.from_bytes(os.urandom(8), "little") or 1
        self._salt = _mix(self._state ^ <uint64_t>0x9e3779b97f4a7c15ULL)
        self._windows = {}

    cdef inline Py_ssize_t _below(self, Py_ssize_t m) noexcept:
        # xorshift64*: a uniform pick in [0, m), no Python call
        cdef uint64_t x = self._state
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        self._state = x
        return <Py_ssize_t>(((x * <uint64_t>2685821657736338717ULL) >> 11) % <uint64_t>m)

    cdef _Window _window(self, str service, list order, Py_ssize_t start):
        # this caller's window of `service` (see APERTURE), recomputed when
        # the registry's order changed
        cdef PyObject* p = PyDict_GetItem(self._windows, service)
        cdef _Window w
        cdef uint64_t best[APERTURE]
        cdef uint64_t score
        cdef Py_ssize_t k, pos
        if (p is not NULL and (<_Window>p).order is order
                and (<_Window>p).length == len(order)):
            return <_Window>p
        w = _Window.__new__(_Window)
        w.order = order
        w.length = len(order)
        w.n = 0
        for k in range(start, len(order)):
            score = _mix(<uint64_t>hash(order[k]) ^ self._salt)
            if w.n < APERTURE:
                pos = w.n
                w.n += 1
            elif score <= best[APERTURE - 1]:
                continue
            else:
                pos = APERTURE - 1
            while pos > 0 and best[pos - 1] < score:
                best[pos] = best[pos - 1]
                w.idx[pos] = w.idx[pos - 1]
                pos -= 1
            best[pos] = score
            w.idx[pos] = k
        self._windows[service] = w
        return w

    def window(self, str service):
        """The nodes of `service` one of each call's pair is drawn from with
        connections on demand (all of them in the full mesh)."""
        cdef list order = self._nodes(service)
        cdef Py_ssize_t start = 1 if order and order[0] == self._local else 0
        if not self._dial or len(order) - start <= APERTURE:
            return order[start:]
        w = self._window(service, order, start)
        return [order[w.idx[k]] for k in range(w.n)]

    def __call__(self, str service):
        cdef list order = self._nodes(service)
        cdef Py_ssize_t n = len(order)
        cdef Py_ssize_t start, m, i, j, k
        cdef object head
        cdef double now
        cdef Seen si, sj, sk
        cdef Ranking r
        cdef _Window w
        if n < 2:
            return order                 # nothing to choose between
        # (the registry's own name object, most often: no string compare)
        head = order[0]
        start = 1 if head is self._local or head == self._local else 0
        m = n - start
        if m < 2:
            return order
        if self._dial and m > APERTURE:
            w = self._window(service, order, start)
            i = self._below(APERTURE)
            j = self._below(APERTURE - 1)
            j += j >= i
            i, j = w.idx[i], w.idx[j]
        else:
            i = self._below(m)
            j = self._below(m - 1)
            j += j >= i
            i += start
            j += start
        now = _now()
        _seen_on(self._conns, order[i], service, now, self._dial, &si)
        _seen_on(self._conns, order[j], service, now, self._dial, &sj)
        if not _first_wins(&si, &sj, now):
            i, j = j, i              # (i the pair's winner, j its loser)
            si = sj
        if self._dial and m > APERTURE and si.in_flight:
            # the window's winner, with calls waiting, against any node (it
            # keeps a tie); an idle winner keeps the call whatever its
            # latency: one slow reply is no reason for a new connection
            k = self._below(m) + start
            if k != i and k != j:
                _seen_on(self._conns, order[k], service, now, True, &sk)
                if not _first_wins(&si, &sk, now):
                    i = k
        r = Ranking.__new__(Ranking)
        r._order = order
        r._conns = self._conns
        r._service = service
        r._dial = self._dial
        r._start = start
        r._best = i
        return r
