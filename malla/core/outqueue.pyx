# The out-queue: what waits to be written, and in which order (sans-IO).

cdef class _LargeMessage:
    # An encoded message bigger than one frame, sent a frame per round.  Its
    # payload is a list of buffers: our encoding around the detached values.

    cdef int take_into(self, list bufs, Py_ssize_t n) except -1:
        # Append the next n payload bytes to bufs as views (no copy).
        cdef object part
        cdef Py_ssize_t size, take
        while n > 0:
            part = self.parts[self.part_index]
            size = len(part)
            take = size - self.part_offset
            if take > n:
                take = n
            if self.part_offset == 0 and take == size:
                bufs.append(part)
            else:
                bufs.append(memoryview(part)[self.part_offset:self.part_offset + take])
            self.part_offset += take
            n -= take
            if self.part_offset == size:
                self.parts[self.part_index] = None      # the transport holds it now
                self.part_index += 1
                self.part_offset = 0
        return 0


cdef class OutQueue:
    """The order in which frames leave a connection; never sees a transport.

    Small frames are coalesced: on a quiet connection a message is written at
    once (no added latency); under load, the frames of one loop tick leave in
    one write (one syscall per batch, and batches are not split: writing the
    first call of a busy tick at once would make the peer answer it alone,
    and the batches fragment from there).  Large messages go one frame of
    each per round, round robin, so that a small frame never waits behind
    more than one frame of any of them; with a window (CAP_WINDOW) a frame
    goes only while the peer has acknowledged enough, which bounds what a
    small frame finds ahead of it in the kernel's buffers too.
    """

    def __cinit__(self):
        self.large = []

    def __len__(self):
        return PyList_GET_SIZE(self.large)

    cdef int add_large(self, WriteBuffer wb, Py_ssize_t start, Py_ssize_t length,
                       Py_ssize_t max_frame_size) except -1:
        # Take the message encoded at `start` out of the write buffer, to be
        # sent in frames of at most max_frame_size (and LARGE_FRAME).
        # Returns 1 when it makes a backlog (see `backlog`).
        cdef Py_ssize_t chunk = LARGE_FRAME if LARGE_FRAME <= max_frame_size else max_frame_size
        cdef const char* h = wb._buf + start
        cdef _LargeMessage m = _LargeMessage.__new__(_LargeMessage)
        cdef Py_ssize_t frames
        m.ftype = <uint8_t>h[0]
        m.flags = <uint8_t>h[1]
        m.sid = _get_u64(h + 8)
        m.length = length
        # frames of equal size: a message just over the limit goes as two
        # halves, not a full frame and a sliver that waits for a drain
        frames = (length + chunk - 1) // chunk
        m.chunk = (length + frames - 1) // frames
        m.parts = wb.take_parts(start, start + HEADER_SIZE)
        self.queued += length
        self.large.append(m)
        if PyList_GET_SIZE(self.large) > 1 and self.queued > WRITE_HIGH_WATER and not self.backlog:
            # One large message streams while small calls go on; more
            # behind it are a backlog the caller must wait for (its memory
            # is ours to bound), as for a full transport.
            self.backlog = True
            return 1
        return 0

    cdef int round(self, list bufs) except -1:
        # One frame of each large message, appended to bufs.  The messages
        # served go to the back, and a round stops at the first message the
        # window has no room for (it goes first next time), so that no
        # message starves behind another's frames.  Returns how many
        # messages were sent to their end.
        cdef _LargeMessage m
        cdef Py_ssize_t chunk
        cdef Py_ssize_t i = 0, n = PyList_GET_SIZE(self.large)
        cdef list served = []
        cdef int finished = 0
        cdef bint last
        cdef bint windowed = self.window > 0
        while i < n:
            m = <_LargeMessage>self.large[i]
            chunk = m.length - m.sent
            if chunk > m.chunk:
                chunk = m.chunk
            if windowed and self.credit < chunk:
                break
            i += 1
            last = m.sent + chunk >= m.length
            bufs.append(_frame_header(m.ftype, m.flags | (0 if last else FLAG_MORE), m.sid,
                                      <uint32_t>chunk))
            m.take_into(bufs, chunk)
            m.sent += chunk
            self.queued -= chunk
            if windowed:
                self.credit -= chunk
            if not last:
                served.append(m)
                continue
            finished += 1
            if m.cancel_after:
                # a CANCEL for a peer that cannot take one inside a message
                bufs.append(_frame_header(FT_CANCEL, 0, m.sid, 0))
        self.large = self.large[i:] + served
        return finished

    cdef bint can_send(self):
        """A round would send something now (the window permitting)."""
        return PyList_GET_SIZE(self.large) > 0 and (
            self.window <= 0 or self.credit >= (<_LargeMessage>self.large[0]).chunk)

    cdef bint drained(self):
        """The backlog has just drained (to a quarter of the high-water
        mark, or to the one message streaming): callers may send again."""
        if self.backlog and (self.queued <= WRITE_HIGH_WATER // 4
                             or PyList_GET_SIZE(self.large) <= 1):
            self.backlog = False
            return True
        return False

    cdef bint cancel(self, uint64_t sid, bint cancel_inside) except -1:
        """Call `sid` is cancelled: its message, if still queued, is not sent
        -- not at all when none of it has gone; when some has, not the rest
        either if the peer can take a CANCEL inside a message (`cancel_inside`:
        CAP_WINDOW; it drops what it has, and the rest of a 100 MB argument
        nobody waits for does not cross).  Otherwise the peer gets the rest,
        then the CANCEL.  True: the CANCEL is to be sent now."""
        cdef _LargeMessage m
        cdef Py_ssize_t i
        for i in range(PyList_GET_SIZE(self.large)):
            m = <_LargeMessage>self.large[i]
            if m.sid != sid or m.ftype != FT_CALL:
                continue
            if m.sent and not cancel_inside:
                m.cancel_after = True
                return False
            del self.large[i]
            self.queued -= m.length - m.sent
            break
        return True

    cdef bint write_now(self, Py_ssize_t in_flight):
        """A small message was queued outside a read: write it at once?  Yes
        when the connection is quiet (at most this one call or task in
        flight, nothing written yet this tick, and the last tick queued a
        single message); under load it waits for the tick's end."""
        self._queued_this_tick += 1
        if not self._wrote_this_tick and not self._busy_tick and in_flight <= 1:
            self._wrote_this_tick = True
            return True
        return False

    cdef void end_tick(self):
        self._wrote_this_tick = False
        self._busy_tick = self._queued_this_tick > 1
        self._queued_this_tick = 0

    cdef void clear(self):
        self.large = []
        self.queued = 0
        self.backlog = False
