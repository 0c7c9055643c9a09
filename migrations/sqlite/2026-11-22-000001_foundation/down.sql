DROP TRIGGER audit_log_refuse_delete;
DROP TRIGGER audit_log_refuse_update;
DROP TABLE audit_log;
DROP TABLE users;
