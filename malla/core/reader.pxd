# The frame reader.

# sans-IO: final, never subclassed (direct C calls, no vtable lookups)
@cython.final
cdef class FrameReader:
    cdef char* _buf
    cdef Py_ssize_t _size
    cdef Py_ssize_t _start
    cdef Py_ssize_t _end
    cdef Py_ssize_t _need
    cdef public uint32_t max_frame_size

    cdef int _make_room(self, Py_ssize_t want) except -1
    cdef object get_buffer_view(self)
    cdef int next_frame(self, Frame* out) except -1
    cdef void compact_if_idle(self, bint shrink)
