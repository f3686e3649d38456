"""
The runtime core: what the L7R, the HKD and the admin tools agree on about
VMs and sessions, without I/O of its own.

- L{qvd.runtime.session}: the state machine of one user session (claim,
  takeover, abort, claim expiry, L7R death) and the verdict on a claim
  found on a VM's row.
"""
