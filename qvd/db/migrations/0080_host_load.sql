-- A node's live load (issue 11, item 6), written by its HKD at every
-- heartbeat: the memory it has available now (MemAvailable, MB) and the
-- fraction of its CPU that was idle since the previous heartbeat. The L7R's
-- placement uses them beside the VMs bound and starting on the node; NULL
-- until the first heartbeat that reports them.
ALTER TABLE host_runtimes ADD COLUMN free_ram integer;
ALTER TABLE host_runtimes ADD COLUMN cpu_idle real;
