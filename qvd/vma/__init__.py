"""
The VMA: the agent inside each desktop (SimpleRPC on port 3030, nxagent).

    python3 -m qvd.vma --config /etc/qvd/vma.conf     # in desktop images
    twistd -n qvd-vma --config /etc/qvd/vma.conf       # elsewhere

Modules: L{agent} (the SimpleRPC functions over the session), L{session} (the
X-session state machine, pure), L{options} (session properties and the
nxagent options line), L{provision} (users and homes), L{system} (seams to
the OS), L{rpcserver} (SimpleRPC over Twisted), L{service} (both entry
points), L{client} (L{client.VMAClient}, used by the HKD and the L7R).

Everything the VMA itself imports is the standard library, Twisted (22.4
API), attrs and zope.interface: desktop images run it on Debian's python3.
"""
