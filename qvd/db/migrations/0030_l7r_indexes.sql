-- L7R: indexes for the rows it touches per connection, so that its short
-- serializable transactions lock index ranges, not whole tables (fewer
-- serialization failures when many clients connect at once).
CREATE INDEX IF NOT EXISTS user_tokens_user_id ON user_tokens (user_id);
CREATE INDEX IF NOT EXISTS vms_user_id ON vms (user_id);
