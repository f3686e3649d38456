"""
Listening sockets shared by the L7R's worker processes: one per worker, all
bound to the same address with C{SO_REUSEPORT}, made and held by the
supervising process (L{qvd.l7r.workers}) and inherited by the workers.

    sockets = reuseport_sockets("127.0.0.1", 8443, count=2, spread="address")
    sockets[0].getsockname()        # the port, also when 8443 was 0

The kernel hands each new connection to one socket of the group. With
C{spread="address"} a small classic BPF program attached to the group chooses
the socket from the client's address (IPv4, IPv6, IPv4-mapped), so every
connection of one client address reaches the same worker: the per-address
connection caps and login limits of a worker are then exact. With
C{"connection"} the kernel's own hash of each connection's addresses and
ports spreads them.

Because the supervisor holds the sockets, a worker that dies loses no
connection: what arrives for its socket waits in the socket's queue until
the worker started in its place accepts it.
"""

import ctypes
import socket
import struct

SPREADS = ("address", "connection")

_SO_ATTACH_REUSEPORT_CBPF = 51

# Classic BPF (linux/filter.h): opcodes and the offset of the network header.
_LD_W_ABS = 0x20        # BPF_LD | BPF_W | BPF_ABS
_LD_B_ABS = 0x30        # BPF_LD | BPF_B | BPF_ABS
_RSH_K = 0x74           # BPF_ALU | BPF_RSH | BPF_K
_MOD_K = 0x94           # BPF_ALU | BPF_MOD | BPF_K
_JEQ_K = 0x15           # BPF_JMP | BPF_JEQ | BPF_K
_RET_A = 0x16           # BPF_RET | BPF_A
_NET_OFF = -0x100000    # SKF_NET_OFF


class SocketError(Exception):
    """The listening sockets cannot be made (the message says why)."""


def _insn(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def address_program(count):
    """
    The classic BPF program choosing socket C{client address mod count}:
    the last 32 bits of the source address of IPv4 and IPv6 packets.
    """
    return [
        _insn(_LD_B_ABS, 0, 0, _NET_OFF),           # A = first byte of the IP header
        _insn(_RSH_K, 0, 0, 4),                     # A = IP version
        _insn(_JEQ_K, 0, 3, 6),                     # IPv6? else skip 3
        _insn(_LD_W_ABS, 0, 0, _NET_OFF + 20),      # A = last word of the IPv6 source
        _insn(_MOD_K, 0, 0, count),
        _insn(_RET_A, 0, 0, 0),
        _insn(_LD_W_ABS, 0, 0, _NET_OFF + 12),      # A = IPv4 source
        _insn(_MOD_K, 0, 0, count),
        _insn(_RET_A, 0, 0, 0),
    ]


def worker_of(address, count):
    """
    The index of the socket (worker) that L{address_program} gives
    connections from C{address} (for tests and the docs' examples).
    """
    import ipaddress
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return int.from_bytes(ip.packed[-4:], "big") % count


def _attach(sock, program):
    code = b"".join(program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)


def reuseport_sockets(interface, port, count, spread="address", backlog=4096):
    """
    C{count} listening TCP sockets on C{interface}:C{port} sharing the port
    (port 0: one the kernel chooses, the same for all), in the order of the
    kernel's group (socket i is chosen for index i). Raises L{SocketError}
    or OSError (the bind's, e.g. EADDRINUSE).
    """
    if spread not in SPREADS:
        raise SocketError(f"l7r.workers.spread must be one of {', '.join(SPREADS)}, "
                          f"not {spread!r}")
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sockets = []
    try:
        for i in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.set_inheritable(True)
            sock.setblocking(False)     # shared with the workers, which accept
            if i == 0 and spread == "address" and count > 1:
                try:
                    _attach(sock, address_program(count))
                except OSError as e:
                    raise SocketError(f"the kernel refused the program that spreads "
                                      f"connections by address ({e.strerror}); set "
                                      "l7r.workers.spread = connection") from e
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
