-- Token expiry and last use. Keep in step with ../postgres/0005_token_expiry.sql.
-- expires_at_ms: NULL means the token never expires; a token past it is refused (401).
-- last_used_at_ms: NULL until first used; written at most once a minute per token, so
-- authenticating a request does not write on every request.
ALTER TABLE api_tokens ADD COLUMN expires_at_ms INTEGER;
ALTER TABLE api_tokens ADD COLUMN last_used_at_ms INTEGER;
