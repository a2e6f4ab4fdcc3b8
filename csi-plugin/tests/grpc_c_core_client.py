"""A CSI call the way tools not written in Go make it: Python's grpcio (gRPC
C-core) dialling the unix socket, which sends the socket's path as the
request's :authority. Prints the name GetPluginInfo answers.

Usage: grpc_c_core_client.py SOCKET_PATH
"""

import sys

import grpc


def plugin_name(socket):
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        call = channel.unary_unary(
            "/csi.v1.Identity/GetPluginInfo",
            request_serializer=lambda _: b"",
            response_deserializer=lambda raw: raw,
        )
        raw = call(None, timeout=10)
    # GetPluginInfoResponse: field 1 (name), length-delimited, a short string.
    if len(raw) < 2 or raw[0] != 0x0A:
        raise SystemExit(f"unexpected GetPluginInfoResponse {raw!r}")
    return raw[2 : 2 + raw[1]].decode()


if __name__ == "__main__":
    print(plugin_name(sys.argv[1]))
