"""malla's benchmark harness: ``python -m bench`` (see bench/README.md).

Every system (the floor, the C floor, gRPC, Pyro5, rpyc, malla) runs in the same run on
the same machine, servers and clients in separate processes over loopback.
"""
