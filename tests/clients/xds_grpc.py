"""Real gRPC peers (Python grpcio) for the xDS tests.

    xds_grpc.py servers N
        Starts N gRPC servers on free loopback ports; each answers the method
        /wasd.test.Echo/Who with its own name (s0, s1, ...). Prints "ports P0 P1 ...",
        then serves until stdin closes.

    xds_grpc.py client
        A gRPC client whose channels resolve xds:///TARGET through the control plane
        the bootstrap file in GRPC_XDS_BOOTSTRAP names. Reads commands from stdin,
        "call TARGET N": N calls of /wasd.test.Echo/Who on the channel to
        xds:///TARGET (kept open between commands), each with a 3 s deadline; prints
        one JSON line {"ok": {"s0": count, ...}, "errors": {"UNAVAILABLE": count, ...}}.
        "until TARGET NAME": calls (1 s deadline each) until one is answered by NAME;
        prints "answered CALLS" (at most 100 000 calls, else "never").
        "csds - -": what the client's xDS client holds, as its own CSDS service
        (grpcio-csds) reports it: one JSON line, a list of
        [type, name, status, version] (type: the type URL's last part).
"""

import json
import sys
from concurrent import futures

import grpc

METHOD = "/wasd.test.Echo/Who"


class Who(grpc.GenericRpcHandler):
    def __init__(self, name):
        self.name = name.encode()

    def service(self, details):
        if details.method == METHOD:
            return grpc.unary_unary_rpc_method_handler(lambda request, context: self.name)
        return None


def servers(count):
    running, ports = [], []
    for i in range(count):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers((Who(f"s{i}"),))
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        running.append(server)
    print("ports", *ports, flush=True)
    sys.stdin.read()
    for server in running:
        server.stop(0)


def client_status(state):
    """The client's xDS resources through a CSDS service in this process."""
    from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
    import grpc_csds

    if "csds" not in state:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        grpc_csds.add_csds_servicer(server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        state["csds"] = (server, stub)
    _, stub = state["csds"]
    response = stub.FetchClientStatus(csds_pb2.ClientStatusRequest(), timeout=5)
    resources = []
    for config in response.config:
        for xds in config.generic_xds_configs:
            field = xds.DESCRIPTOR.fields_by_name["client_status"]
            status = field.enum_type.values_by_number[xds.client_status].name
            resources.append([xds.type_url.rsplit(".", 1)[-1], xds.name, status, xds.version_info])
    return sorted(resources)


def client():
    channels = {}
    state = {}
    for line in sys.stdin:
        command, target, argument = line.split()
        if command == "csds":
            print(json.dumps(client_status(state)), flush=True)
            continue
        channel = channels.get(target)
        if channel is None:
            channel = channels[target] = grpc.insecure_channel("xds:///" + target)
        who = channel.unary_unary(METHOD)
        if command == "until":
            wanted = argument.encode()
            for calls in range(1, 100_001):
                try:
                    if who(b"", timeout=1) == wanted:
                        print("answered", calls, flush=True)
                        break
                except grpc.RpcError:
                    pass
            else:
                print("never", flush=True)
            continue
        assert command == "call", line
        count = argument
        ok, errors = {}, {}
        for _ in range(int(count)):
            try:
                name = who(b"", timeout=3).decode()
                ok[name] = ok.get(name, 0) + 1
            except grpc.RpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1
        print(json.dumps({"ok": ok, "errors": errors}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "servers":
        servers(int(sys.argv[2]))
    else:
        client()
