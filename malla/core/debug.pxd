# The debug build's checks (MALLA_DEBUG): compiled out of a normal build.

cdef extern from *:
    """
    #ifdef MALLA_DEBUG
    #define MALLA_DEBUG_BUILD 1
    #else
    #define MALLA_DEBUG_BUILD 0
    #endif
    """
    const bint MALLA_DEBUG_BUILD
