# ERROR frames' bodies (docs/protocol.md, "Error codes"): the one place that
# builds the body of an error the core sends, and reads the body of one it
# receives, outside CoreProtocol (whose size is capped).

cdef list _error_body(int code, str exc_type, str message, object tb, object hint,
                      bint hints):
    # [code, exc_type, message, traceback], and Overloaded's retry_after_ms
    # (`hint`) as a 5th element for a peer of protocol version 2 (`hints`):
    # a version-1 peer gets exactly the bytes version 1 sent
    if hint is not None and hints:
        return [code, exc_type, message, tb, hint]
    return [code, exc_type, message, tb]


cdef inline object _hint(tuple why):
    # the retry_after_ms of a refusal (ServiceEntry._refusal), or None
    return why[3] if PyTuple_GET_SIZE(why) > 3 else None


cdef object _error_of(object body):
    # The caller's exception for a received ERROR body: its first four
    # fields, and a 5th (Overloaded's retry_after_ms) when present; later
    # versions may append more, which are ignored
    code, exc_type, message, tb = body[:4]
    return error_from_wire(int(code), str(exc_type), str(message),
                           tb if isinstance(tb, str) else None,
                           body[4] if len(body) > 4 else None)
