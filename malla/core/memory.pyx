# Memory given back to the system.  Each connection gives back its own
# grown buffers once idle (Wire._idle_check); the process's heap is one for
# all connections, so it is trimmed here, once for any number of them
# going idle together, and never more often than every LARGE_IDLE.

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

cdef bint _trim_scheduled = False


cdef void _trim_process_heap_soon(object loop):
    # glibc keeps freed memory for reuse: hand it back to the system, at the
    # end of this loop tick (every connection idle now has freed its share)
    global _trim_scheduled
    if not _trim_scheduled:
        _trim_scheduled = True
        loop.call_later(LARGE_IDLE, _trim_process_heap)


def _trim_process_heap():
    global _trim_scheduled
    _trim_scheduled = False
    malla_trim_heap()
