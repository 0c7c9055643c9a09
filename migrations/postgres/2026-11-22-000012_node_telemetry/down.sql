DROP TABLE server_events;
DROP TABLE node_heartbeats;
ALTER TABLE nodes DROP COLUMN connectivity;
ALTER TABLE nodes DROP COLUMN last_heartbeat_at;
