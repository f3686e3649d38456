-- The last TOTP time step accepted for each user, so that a code cannot be
-- used twice within its validity window (RFC 6238 section 5.2); written by
-- the L7R's totp authentication plugin.
CREATE TABLE user_totp_steps (
    user_id     integer PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    last_step   bigint NOT NULL
);
