DROP TABLE server_activity;
