-- The per-VM secret of the agent (issue 8): created by the HKD at every start,
-- handed to the VMA through the desktop's private configuration, sent by the
-- HKD and the L7R with every SimpleRPC call.
ALTER TABLE vm_runtimes ADD COLUMN vma_secret text;
