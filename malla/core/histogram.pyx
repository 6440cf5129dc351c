# LatencyHistogram: call durations, recorded in C.

cdef class LatencyHistogram:
    """Durations in a log-scale histogram: four buckets per power of two of
    microseconds (about 19% relative error), constant memory, recorded in C
    (metrics must stay cheap on the call path)."""

    def record_ns(self, int64_t ns):
        # (ns - 1) // 1000: a bucket holds the durations in (lower, upper]
        # microseconds, upper bound included, as Prometheus's `le` is
        cdef uint64_t us = <uint64_t>((ns - 1) // 1000) if ns > 1000 else 1
        cdef int octave = 63 - __builtin_clzll(us)
        cdef int sub = <int>((us >> (octave - 2)) & 3) if octave >= 2 else <int>(us & 3)
        cdef int index = octave * 4 + sub
        if index > 255:
            index = 255
        self._counts[index] += 1
        self.count += 1
        self.sum_ns += <uint64_t>ns if ns > 0 else 0

    @staticmethod
    def _upper_us(int index):
        cdef int octave = index // 4, sub = index % 4
        if octave < 2:
            return float(2 ** octave + sub + 1)
        if sub < 3:
            return float(2 ** octave + (sub + 1) * 2 ** (octave - 2))
        return float(2 ** (octave + 1))

    def count_below_us(self, uint64_t bound_us):
        """How many durations were at most `bound_us` (Prometheus's `le`), a
        power of two of microseconds from 2 (a bucket boundary, so the count
        is exact to the nanosecond)."""
        cdef int octave, i
        cdef uint64_t n = 0
        if bound_us < 2 or bound_us & (bound_us - 1):
            raise ValueError("a bound is a power of two of microseconds, at least 2")
        octave = 63 - __builtin_clzll(bound_us)
        # every bucket of the octaves below `octave` holds durations < 2**octave
        for i in range(min(octave * 4, 256)):
            n += self._counts[i]
        return n

    def percentile_us(self, double q):
        """The q-quantile (0..1), as its bucket's upper bound in microseconds."""
        cdef double rank = q * self.count
        cdef uint64_t seen = 0
        cdef int i
        if not self.count:
            return 0.0
        for i in range(256):
            seen += self._counts[i]
            if seen >= rank and self._counts[i]:
                return LatencyHistogram._upper_us(i)
        return LatencyHistogram._upper_us(255)
