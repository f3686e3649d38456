-- The node's lease (issue 11, item 5): set by the database clock at every
-- heartbeat of the node's HKD (now() + hkd.lease.seconds); NULL when the node
-- holds none (hkd.lease.seconds = 0). Once it has run out by more than
-- hkd.lease.release.margin, the cluster monitor marks the node lost and
-- releases its VMs; the node's fencer has stopped them before it ran out.
ALTER TABLE host_runtimes ADD COLUMN lease_expires timestamptz;
