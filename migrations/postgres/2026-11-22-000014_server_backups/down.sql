ALTER TABLE tenants DROP COLUMN max_backups_per_server;
DROP TABLE server_backups;
