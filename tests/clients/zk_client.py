"""A ZooKeeper client nobody here wrote (kazoo), driven by the tests over stdin/stdout.

It connects to the given servers (with digest credentials if given), prints one JSON line
{"ready": session_id}, then reads one JSON command per line and answers each with one
JSON line, {"ok": result} or {"error": "..."}:

  ["kratos", service, id, version, endpoints, ephemeral, digest]
      register an instance the way Kratos's Go registry (go-zookeeper) does: the
      persistent parents, then the node with json.Marshal's ServiceInstance
  ["create", path, data, ephemeral]     ["set", path, data]     ["delete", path]
  ["get", path]         -> {"data", "ephemeral_owner", "version"} or null
  ["children", path]    -> [names] or null
  ["acl", path]         -> ["scheme:id:perms", ...]
  ["close"]             -> ends the session (its ephemeral nodes go) and exits
"""

import json
import sys

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError, NodeExistsError
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl


def main():
    servers = sys.argv[1]
    auth = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
    # Credentials sent on every connection, before any request.
    auth_data = [("digest", auth)] if auth else None
    # Commands are retried through a lost connection (an ensemble member killed, an
    # election), as a service's client would.
    client = KazooClient(
        hosts=servers,
        timeout=10.0,
        auth_data=auth_data,
        command_retry={"max_tries": 50, "delay": 0.1, "max_delay": 1.0},
    )
    client.start(timeout=20)
    acl = OPEN_ACL_UNSAFE
    if auth:
        user, password = auth.split(":", 1)
        acl = [make_digest_acl(user, password, all=True)]
    print(json.dumps({"ready": client.client_id[0]}), flush=True)

    def ensure(path, data, ephemeral):
        # go-zookeeper's Exists, then Create: what Kratos's ensureName does. (Retried,
        # the create may find its own earlier attempt.)
        if client.retry(client.exists, path) is None:
            try:
                client.retry(client.create, path, data, acl=acl, ephemeral=ephemeral)
            except NodeExistsError:
                pass

    for line in sys.stdin:
        command = json.loads(line)
        op, args = command[0], command[1:]
        try:
            if op == "kratos":
                service, id_, version, endpoints, ephemeral = args
                # Go's json.Marshal of registry.ServiceInstance: this field order,
                # no spaces, a nil map as null.
                value = json.dumps(
                    {
                        "id": id_,
                        "name": service,
                        "version": version,
                        "metadata": None,
                        "endpoints": endpoints,
                    },
                    separators=(",", ":"),
                ).encode()
                ensure("/microservices", b"", False)
                ensure("/microservices/" + service, b"", False)
                ensure("/microservices/%s/%s" % (service, id_), value, ephemeral)
                result = True
            elif op == "create":
                path, data, ephemeral = args
                client.retry(client.create, path, data.encode(), acl=acl, ephemeral=ephemeral, makepath=True)
                result = True
            elif op == "set":
                client.retry(client.set, args[0], args[1].encode())
                result = True
            elif op == "delete":
                client.retry(client.delete, args[0])
                result = True
            elif op == "get":
                try:
                    data, stat = client.retry(client.get, args[0])
                    result = {
                        "data": data.decode(),
                        "ephemeral_owner": stat.ephemeralOwner,
                        "version": stat.version,
                    }
                except NoNodeError:
                    result = None
            elif op == "children":
                try:
                    result = sorted(client.retry(client.get_children, args[0]))
                except NoNodeError:
                    result = None
            elif op == "acl":
                acls, _ = client.retry(client.get_acls, args[0])
                result = ["%s:%s:%d" % (a.id.scheme, a.id.id, a.perms) for a in acls]
            elif op == "close":
                client.stop()
                client.close()
                print(json.dumps({"ok": True}), flush=True)
                return
            else:
                raise ValueError("unknown command %r" % op)
            print(json.dumps({"ok": result}), flush=True)
        except Exception as e:  # no node, an ACL refusal, a lost connection: say which
            print(json.dumps({"error": "%s: %s" % (type(e).__name__, e)}), flush=True)


if __name__ == "__main__":
    main()
