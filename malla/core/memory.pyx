# Memory given back to the system.  Each connection gives back its own
# grown buffers once idle (Wire._idle_check); the process's heap is one for
# all connections, so it is trimmed here, at most once every LARGE_IDLE
# however many connections go idle together (and whatever loop they run on).

cdef extern from *:
    """
    #if defined(__GLIBC__)
    #include <malloc.h>
    static void malla_trim_heap(void) { malloc_trim(0); }
    #else
    static void malla_trim_heap(void) { }
    #endif
    """
    void malla_trim_heap() nogil

cdef double _trimmed_at = 0


cdef void _trim_process_heap():
    # glibc keeps freed memory for reuse: hand it back to the system
    global _trimmed_at
    cdef double now = _now()
    if now - _trimmed_at >= LARGE_IDLE:
        _trimmed_at = now
        malla_trim_heap()
