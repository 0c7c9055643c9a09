DROP TABLE user_ssh_keys;
