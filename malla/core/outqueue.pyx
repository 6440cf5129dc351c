# The out-queue: large messages sent a frame per round.

@cython.final
cdef class _LargeMessage:
    # An encoded message bigger than one frame, sent a frame per round.  Its
    # payload is a list of buffers: our encoding around the detached values.
    cdef uint8_t ftype
    cdef uint8_t flags
    cdef uint64_t sid
    cdef list parts
    cdef Py_ssize_t part_index, part_offset
    cdef Py_ssize_t length, sent
    cdef Py_ssize_t chunk
    cdef bint cancel_after          # send a CANCEL after its last frame

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
